"""DVC's own files stay readable when a DVC command is killed while writing them.

DVC rewrites ``dvc.lock`` and its read-write lock ``.dvc/tmp/rwlock`` in place (open with
truncation, then write). A `dvc repro` killed in that instant (a machine crash, or graft's own
timeout or interrupt stopping it) leaves the file empty or cut short, and every later DVC
command then fails on it until a person repairs it by hand. So graft, which starts and stops
`dvc repro`, keeps a copy of the last whole ``dvc.lock`` (``.graft/dvc.lock.whole``) before
each one, and checks DVC's files after each one and whenever a run takes the workspace: a
``dvc.lock`` that DVC's own schema rejects is replaced by that copy (an earlier consistent
state: stages finished since are seen as changed, and rerun or restored from DVC's cache), or
removed when there is no copy (nothing recorded: the same); an unreadable rwlock is removed,
as DVC's own error message advises. Nothing is checked while another DVC command holds the
repository lock: it may be writing those files at that moment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graft.atomic import atomic_path
from graft.config.yaml12 import parse_yaml

LOCKFILE = "dvc.lock"
WHOLE_COPY = Path(".graft", "dvc.lock.whole")
RWLOCK = Path(".dvc", "tmp", "rwlock")


def lockfile_is_whole(path: Path) -> bool:
    """Whether the file at ``path`` is a dvc.lock that DVC's own lockfile schema accepts and
    whose every dep and out carries its hash. A missing file is whole (nothing recorded yet).
    Raises OSError when it cannot be read.

    The hashes matter because a file cut at a line boundary can still be valid YAML that the
    schema accepts: an entry left with its ``path`` alone is one DVC was still writing.
    """
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA  # DVC only when asked for

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    try:
        lock = COMPILED_LOCKFILE_SCHEMA(parse_yaml(text))
    except Exception:  # any YAML or schema error: DVC cannot read it either
        return False
    return all(_hashed(entry) for entry in _entries(lock))


def _entries(lock: dict[str, Any]) -> list[dict[str, Any]]:
    stages = lock.get("stages") or {}
    return [
        entry
        for stage in stages.values()
        for kind in ("deps", "outs")
        for entry in stage.get(kind) or []
    ]


def _hashed(entry: dict[str, Any]) -> bool:
    # DVC 3 names the hash in ``hash`` (``hash: md5`` then ``md5: ...``); DVC 2 wrote the
    # value alone. Either way a finished entry has a hash value beside its path.
    algorithm = entry.get("hash")
    if algorithm is not None:
        return bool(entry.get(algorithm))
    return any(entry.get(key) for key in ("md5", "etag", "checksum"))


def keep_whole_copy(root: Path) -> None:
    """Copy the project ``root``'s dvc.lock to ``.graft/dvc.lock.whole`` when it is whole.

    Call before starting a DVC command that may rewrite dvc.lock. Leaves an earlier copy in
    place when dvc.lock is missing or not whole. Raises OSError when the copy cannot be
    written.
    """
    lockfile = root / LOCKFILE
    if not lockfile.exists() or not lockfile_is_whole(lockfile):
        return
    with atomic_path(root / WHOLE_COPY) as temporary:
        shutil.copyfile(lockfile, temporary)


def repair_dvc_files(root: Path) -> list[str]:
    """Make the project ``root``'s dvc.lock and DVC rwlock readable again, if a killed DVC
    command left them broken (see the module's docstring).

    Both files are read first; only when one is broken is DVC's repository lock taken, and
    they are checked again under it; when another DVC command holds it, nothing is touched.
    Returns one line per repair made, for the caller to log; empty when none was needed.
    Raises OSError when a file cannot be read or replaced.
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    if not (root / ".dvc").is_dir():  # not a DVC project (yet): no DVC files to repair
        return []
    if lockfile_is_whole(root / LOCKFILE) and _rwlock_is_whole(root / RWLOCK):
        return []  # the usual case, at every run's start: no need to open the repository
    repairs: list[str] = []
    try:
        with Repo(str(root)) as repo, repo.lock:
            repairs += _repair_lockfile(root)
            repairs += _repair_rwlock(root)
    except LockError:  # another DVC command is running: its files may be mid-write
        return []
    return repairs


def _repair_lockfile(root: Path) -> list[str]:
    lockfile, copy = root / LOCKFILE, root / WHOLE_COPY
    if lockfile_is_whole(lockfile):
        return []
    if copy.exists() and lockfile_is_whole(copy):
        with atomic_path(lockfile) as temporary:
            shutil.copyfile(copy, temporary)
        return [
            f"{LOCKFILE} was cut short by a DVC command that was killed while writing it; "
            f"put back its last whole copy ({WHOLE_COPY}): stages finished since then run "
            "again or come from DVC's cache"
        ]
    lockfile.unlink()
    return [
        f"{LOCKFILE} was cut short by a DVC command that was killed while writing it, and no "
        "whole copy was kept: removed it; every stage runs again or comes from DVC's cache"
    ]


def _rwlock_is_whole(path: Path) -> bool:
    """Whether DVC can read its rwlock at ``path``: a JSON object, or no file at all."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _repair_rwlock(root: Path) -> list[str]:
    rwlock = root / RWLOCK
    if _rwlock_is_whole(rwlock):
        return []
    rwlock.unlink()
    return [f"{RWLOCK} was cut short by a DVC command killed while writing it: removed it"]
