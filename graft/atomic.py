"""Atomic writes: an output appears whole or not at all.

Every stage writes through these helpers, so a crash or a Ctrl-C mid-write never leaves a
half-written file or folder for DVC to cache. The temporary lives next to the destination
(same filesystem) so the final rename is atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(destination: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``destination`` in one rename.

    With ``directory`` the temporary is a folder. Whatever the block raises is raised again
    after the temporary is removed, and ``destination`` is left as it was. Raises OSError when
    the temporary cannot be made or renamed.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}.tmp-"
    if directory:
        temporary = Path(tempfile.mkdtemp(prefix=prefix, dir=destination.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=destination.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        # mkstemp/mkdtemp create owner-only entries; outputs are ordinary files.
        temporary.chmod(0o755 if directory else 0o644)
        if directory:
            _replace_directory(temporary, destination)
        else:
            os.replace(temporary, destination)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise


def _replace_directory(new: Path, destination: Path) -> None:
    # A directory cannot be atomically replaced while it exists: move the old one aside
    # first, so at every instant the destination is either the old whole or the new whole.
    if destination.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, retired / destination.name)
        os.replace(new, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(new, destination)


def write_text(destination: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``destination`` atomically; raises OSError on failure."""
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(destination: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON with sorted keys, atomically; raises TypeError for
    values JSON cannot hold and OSError on failure."""
    write_text(destination, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_csv(destination: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` as CSV (no index, ``\\n`` line ends) atomically; raises OSError on failure.

    ``frame`` is written as is: validate it against its schema first where it has one.
    """
    with atomic_path(destination) as temporary:
        frame.to_csv(temporary, index=False, lineterminator="\n")
