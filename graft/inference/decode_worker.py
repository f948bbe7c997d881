"""The work a decoding process does for a prediction: ingest's check and training's decode.

Kept apart from the model code so that worker processes import Pillow and numpy only, not
torch (importing torch took seconds per worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.data.sources import SourceFile
from graft.data.verify import CheckSettings, FileRecord, judge_bytes, read_file
from graft.hashing import sha256_hex


@dataclass(frozen=True)
class DecodeTask:
    """One input ``file`` to judge under ``settings`` and decode to ``size`` x ``size``
    pixels (the model's input)."""

    file: SourceFile
    settings: CheckSettings
    size: int


def check_and_decode(task: DecodeTask) -> tuple[FileRecord, np.ndarray | None]:
    """Read ``task.file`` once, judge it as ingest does and, when accepted, decode it as
    training does: its record (label "") and its uint8 (size, size, 3) HWC RGB pixels (None
    unless accepted). A decode that runs out of the memory budget is ``too_large``. Raises
    nothing."""
    file, settings = task.file, task.settings
    data, _ = read_file(file, settings)
    if isinstance(data, FileRecord):  # not read: why is its verdict
        return data, None
    check, pixels = judge_bytes(data, settings, task.size)
    return FileRecord.of(file.relative, file.label, sha256_hex(data), len(data), check), pixels
