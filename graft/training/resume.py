"""Where an interrupted training stage keeps its per-epoch state, keyed by everything it depends on.

The folder is ``<paths.<stage>.resume>/<key>``, where the key hashes the stage's settings, its
input files and the graft library's code. A state written under other inputs, settings or code
lives under another key and is never picked up; the stage deletes the whole folder once its
outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from graft.hashing import file_sha256

CODE = Path(__file__).resolve().parents[1]  # the graft package
ResumeKey = Sequence[BaseModel | str | int | float]  # settings the stage's result depends on


def resume_folder(root: Path, settings: ResumeKey, inputs: list[Path]) -> Path:
    """``root/<key>`` for these settings, input files and this code (the folder may not exist).

    Raises OSError when an input file cannot be read.
    """
    digest = hashlib.sha256()
    for item in settings:
        value = item.model_dump(mode="json") if isinstance(item, BaseModel) else item
        digest.update(json.dumps(value, sort_keys=True).encode())
    for path in inputs:
        digest.update(f"{path}:{file_sha256(path)}".encode())
    for source in sorted(CODE.rglob("*.py")):
        digest.update(f"{source.relative_to(CODE)}:".encode() + source.read_bytes())
    return root / digest.hexdigest()[:16]


def clear(root: Path) -> None:
    """Forget every saved state of the stage (the folder ``root`` and all in it): it finished.

    A ``root`` that is a link to a folder (a stage's work tree shares its clone's resume
    folder, flows/worktrees.py) is emptied and left in place. A missing folder is fine; errors
    while deleting are ignored.
    """
    if root.is_symlink():
        for saved in root.iterdir() if root.is_dir() else []:
            shutil.rmtree(saved, ignore_errors=True)
        return
    shutil.rmtree(root, ignore_errors=True)
