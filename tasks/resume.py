"""Where an interrupted training stage keeps its per-epoch state, keyed by everything it depends on.

The folder is ``<paths.<stage>.resume>/<key>``, where the key hashes the stage's params, its
input files and the training code. A state written under other inputs, params or code lives
under another key and is never picked up; the stage deletes the whole folder once its outputs
are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from tasks.hashing import file_sha256

CODE = Path(__file__).resolve().parent


def resume_folder(root: Path, settings: list[BaseModel], inputs: list[Path]) -> Path:
    """``root/<key>`` for these settings, input files and this code (the folder may not exist)."""
    digest = hashlib.sha256()
    for model in settings:
        digest.update(json.dumps(model.model_dump(mode="json"), sort_keys=True).encode())
    for path in inputs:
        digest.update(f"{path}:{file_sha256(path)}".encode())
    for source in sorted(CODE.glob("*.py")):
        digest.update(source.read_bytes())
    return root / digest.hexdigest()[:16]


def clear(root: Path) -> None:
    """Forget every saved state of the stage: it finished."""
    shutil.rmtree(root, ignore_errors=True)
