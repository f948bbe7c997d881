"""The workspace lock: never two pipeline runs, and so never two ``dvc.lock`` writers, at once.

An OS file lock (``flock``, through the filelock library) on ``.graft/run.lock``: the kernel
drops it when the holding process exits, however it exits, so a crashed run never leaves the
workspace locked. The holder writes its pid beside the lock (``run.lock.holder``) so that a
refused run can say who holds the workspace; that file is only a note, the flock is the lock.

A stage runs as `dvc repro` in a session of its own, which outlives the run's process when
that is killed outright (SIGKILL, a machine's out-of-memory killer): it would go on training
and holding DVC's locks with nobody to wait for it. So the running stage's session is recorded
beside the lock (``stage.json``: its pid and process start time) while it runs. A run that
acquires the workspace and finds a record whose session is still running knows, by the flock,
that the run which started it is dead: it stops that orphaned session before anything else,
then repairs DVC's files if that run died while DVC wrote them (flows/dvc_files.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
from filelock import FileLock, Timeout
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows.dvc_files import repair_dvc_files
from graft.processes import group_running, stop_process_group

STAGE_RECORD = "stage.json"  # in .graft/: the running stage's session, while it runs
# An orphaned `dvc repro` gets what a Ctrl-C would give it, so that DVC releases its locks;
# this long to stop, then SIGKILL.
ORPHAN_GRACE_S = 5.0


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
        _stop_orphaned_stage(root)
        for line in repair_dvc_files(root):  # a run that died while DVC wrote them
            _logger().warning("%s", line)
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


def record_stage_session(root: Path, stage: str, pid: int) -> None:
    """Note in the workspace of the project ``root`` that ``stage`` runs in the session led by
    ``pid`` (a `dvc repro` started in a session of its own), with that process's start time,
    so that a later run can tell the session apart from an unrelated process that reused the
    pid. Call while holding the workspace. Writes nothing when ``pid`` has already exited and
    been reaped. Raises OSError when the note cannot be written."""
    try:
        note = {"stage": stage, "pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.NoSuchProcess:  # already gone: no session to stop, ever
        return
    path = root / ".graft" / STAGE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(note), encoding="utf-8")
    partial.replace(path)  # never half a note for the next run to read


def forget_stage_session(root: Path) -> None:
    """Remove the note of :func:`record_stage_session` once the stage's session has ended.
    Raises nothing for a note that is already gone."""
    (root / ".graft" / STAGE_RECORD).unlink(missing_ok=True)


def _stop_orphaned_stage(root: Path) -> None:
    """Stop the stage sessions a dead run left running (see the module's docstring), in the
    workspace and in its stages' work trees (flows/worktrees.py), log one line for each, and
    remove their notes. Called holding the workspace lock."""
    in_worktrees = root.glob(f".graft/worktrees/*/.graft/{STAGE_RECORD}")
    for note in [root / ".graft" / STAGE_RECORD, *in_worktrees]:
        _stop_orphan_of(note)


def _stop_orphan_of(path: Path) -> None:
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
        stage, pid, started = str(note["stage"]), int(note["pid"]), float(note["started"])
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):  # not ours to read: nothing to act on
        path.unlink(missing_ok=True)
        return
    if _is_that_session(pid, started) and group_running(pid):
        stop_process_group(pid, ORPHAN_GRACE_S, signal.SIGINT)
        _logger().warning(
            "%s: stopped `dvc repro` (pid %d) and its stage command, left running by a "
            "graft run that died without stopping it",
            stage,
            pid,
        )
    path.unlink(missing_ok=True)


def _is_that_session(pid: int, started: float) -> bool:
    """Whether the process group ``pid`` is still the session of the note: its leader, if
    alive, is the process that started at ``started`` (else the pid was reused). A group whose
    leader has exited is taken for the same session: a pid still in use as a process group's
    id is never handed out again (only a whole new session, itself dead but for some of its
    processes, could fool this)."""
    try:
        leader = psutil.Process(pid)
        return abs(leader.create_time() - started) < 0.01 and os.getpgid(pid) == pid
    except (psutil.NoSuchProcess, ProcessLookupError):
        return True  # the leader is gone; what is left of its group is that session's
    except psutil.Error:
        return False


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    with suppress(MissingContextError):
        return get_run_logger()  # in a flow run: into its log, in the UI too
    return logging.getLogger(__name__)
