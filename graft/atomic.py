"""Atomic writes: an output appears whole or not at all.

Every stage writes through these helpers, so a crash or a Ctrl-C mid-write never leaves a
half-written file or folder for DVC to cache. The temporary lives next to the destination
(same filesystem) so the final rename is atomic.

A writer killed outright (SIGKILL, out of memory, power) cannot remove its temporary, so each
temporary is named after its writer: ``.<name>.tmp-<pid>-<host>-<random>`` (and a retired
folder ``.<name>.old-<pid>-<host>-<random>``), ``<host>`` a short hash of the machine's name.
The next write of the same destination removes those whose writer is no longer running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graft.processes import HOST_TAG, process_running

if TYPE_CHECKING:  # pandas only for write_csv: the scan stage must start fast
    import pandas as pd


@contextmanager
def atomic_path(destination: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``destination`` in one rename.

    With ``directory`` the temporary is a folder. Whatever the block raises is raised again
    after the temporary is removed, and ``destination`` is left as it was. Temporaries of
    ``destination`` left by writers on this machine that are no longer running are removed
    first. Raises OSError when the temporary cannot be made or renamed.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(destination)
    prefix = _prefix(destination, "tmp")
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
        _remove(temporary)
        raise


def _remove_stale_temporaries(destination: Path) -> None:
    """Remove the temporaries (``.tmp-``) and retired folders (``.old-``) of ``destination``
    whose writer, a process on this machine, is no longer running.

    A running writer's are kept, and so are those of other machines and those without a
    writer in their name (written before names had one): their owner cannot be told dead. A
    pid reused by a new process only keeps a leftover longer. Raises OSError when the folder
    cannot be listed; errors while removing are ignored (another writer may be removing it).
    """
    start = f".{destination.name}."
    pattern = re.compile(re.escape(start) + r"(?:tmp|old)-(\d+)-" + HOST_TAG + r"-[^.-]+")
    with os.scandir(destination.parent) as entries:
        for entry in entries:
            found = entry.name.startswith(start) and pattern.fullmatch(entry.name)
            if found and not process_running(int(found.group(1))):
                _remove(Path(entry.path))


def _prefix(destination: Path, kind: str) -> str:
    # mkstemp/mkdtemp append random letters, digits and underscores: no dot or dash.
    return f".{destination.name}.{kind}-{os.getpid()}-{HOST_TAG}-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace_directory(new: Path, destination: Path) -> None:
    # A directory cannot be atomically replaced while it exists: move the old one aside
    # first, so the destination is never a mix: the old whole, the new whole, or for the
    # instant between the two renames absent (a writer killed just then leaves both behind,
    # for the next write to remove).
    if destination.exists():
        retired = Path(tempfile.mkdtemp(prefix=_prefix(destination, "old"), dir=destination.parent))
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
