"""The workspace lock: never two pipeline runs, and so never two ``dvc.lock`` writers, at once.

An OS file lock (``flock``, through the filelock library) on ``.graft/run.lock``: the kernel
drops it when the holding process exits, however it exits, so a crashed run never leaves the
workspace locked. The holder writes its pid beside the lock (``run.lock.holder``) so that a
refused run can say who holds the workspace; that file is only a note, the flock is the lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace; raised by :func:`workspace_lock`."""


@contextmanager
def workspace_lock(root: Path, wait_s: float) -> Iterator[None]:
    """Hold the workspace of the project ``root`` for one pipeline run.

    Waits up to ``wait_s`` seconds for another run to let go (0 or less: one attempt), yields
    while holding the lock, and releases it on exit; if the process dies, the OS releases it.
    Raises WorkspaceBusy, naming the lock file and its holder, when the wait runs out, and
    OSError when ``root/.graft`` cannot be created.
    """
    path = root / ".graft" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_name(f"{path.name}.holder")
    # filelock reads a negative timeout as "wait forever"; a negative wait here means none.
    lock = FileLock(path, timeout=max(wait_s, 0.0))
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceBusy(
            f"another graft run holds {path} ({_holder(holder)}); waited {wait_s:g}s"
        ) from None
    try:
        holder.write_text(f"pid {os.getpid()}", encoding="utf-8")
        yield
    finally:
        # Before the release: once released, the next holder may already have written its pid.
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(note: Path) -> str:
    try:
        return note.read_text(encoding="utf-8").strip() or "another process"
    except FileNotFoundError:  # the holder has not written it yet, or has just let go
        return "another process"
