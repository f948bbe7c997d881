"""Child processes: this environment's tools first on PATH, sessions that stop whole.

The flow runs `dvc` (whose stages run `python`), publish runs `dvc status` and `dvc push`; tests
and benchmarks start servers and workers. All must use this environment's executables, as a
user with the environment activated would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil


def env_with_this_python(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) with this interpreter's bin
    folder first on ``PATH``, so that ``python``, ``dvc`` and ``prefect`` are this
    environment's. Returns a new dict; ``base`` is not changed. Raises nothing."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc_command(*args: str) -> list[str]:
    """The command line that runs this environment's DVC with ``args`` (e.g. ``"status"``).

    Returns ``[python, "-m", "dvc", *args]``: the interpreter itself, not a ``dvc`` found on
    ``PATH``, so a shell with another environment first cannot substitute its own DVC. Run it
    with :func:`env_with_this_python`'s environment, so that the stage commands DVC starts
    (``python -m tasks.<stage>``) are this environment's too. Raises nothing.
    """
    return [sys.executable, "-m", "dvc", *args]


def run_dvc(root: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``dvc <args>`` in the project ``root`` and wait for it.

    Takes the project root (DVC's working folder), DVC's arguments, and ``check``: raise when
    DVC exits with an error. Returns the finished process, its stdout and stderr captured as
    text. Raises subprocess.CalledProcessError when ``check`` is set and DVC exits non-zero.
    For output that must be streamed while DVC runs, start :func:`dvc_command` yourself.
    """
    return subprocess.run(
        dvc_command(*args),
        cwd=root,
        env=env_with_this_python(),
        capture_output=True,
        text=True,
        check=check,
    )


def start_in_own_session(
    command: list[str], env: dict[str, str], log: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` in ``cwd`` with environment ``env``, stdout and stderr both into the
    file ``log`` (overwritten), in a session of its own, so that :func:`stop_session` stops it
    and everything it started. Returns the running process without waiting for it. Raises
    OSError when the log cannot be opened or the command cannot be started."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_session(
    process: subprocess.Popen[Any], wait_s: float = 30, first_signal: int = signal.SIGTERM
) -> None:
    """Stop a process started in a session of its own (:func:`start_in_own_session`, or
    ``Popen(..., start_new_session=True)``), with everything still running in its process
    group.

    ``first_signal`` (default SIGTERM) to the whole group, then SIGKILL to whatever of it is
    still running after ``wait_s`` seconds, or at once when the wait is interrupted (a second
    Ctrl-C: the exception propagates once the group is killed). Waits for the process, so
    ``process.returncode`` is set on return. A group with nothing left running is left alone.
    Raises nothing for a group that is already gone; re-raises what interrupted the wait.
    """
    try:
        stop_process_group(process.pid, wait_s, first_signal, reap=process.poll)
    finally:
        if process.poll() is None:  # SIGKILL just sent, or a second interrupt: reap it
            process.wait()


def stop_process_group(
    pgid: int,
    wait_s: float,
    first_signal: int = signal.SIGTERM,
    reap: Callable[[], object] = lambda: None,
) -> bool:
    """Stop every process of the process group ``pgid``: ``first_signal`` to the group, then
    SIGKILL to what is left after ``wait_s`` seconds, or at once when the wait is interrupted
    (the exception then propagates). ``reap`` is called while waiting: the leader's
    ``Popen.poll`` when it is this process's child, so that it does not linger as a zombie.

    Returns False when nothing of the group was running (zombies count as gone), True when
    it was signalled. Raises PermissionError for a group of another user's processes.
    """
    reap()
    if not group_running(pgid):
        return False
    try:
        _signal_group(pgid, first_signal)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            reap()
            if not group_running(pgid):
                return True
    finally:  # the grace ran out, or a second interrupt cut it short
        if group_running(pgid):
            _signal_group(pgid, signal.SIGKILL)
    return True


# This machine, in names of temporary files that carry their writer's pid: a pid means
# nothing on another host sharing the folder (NFS), so only this host's are judged by pid.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def process_running(pid: int) -> bool:
    """Whether process ``pid`` of this host may still write: True when it runs or cannot be
    inspected (another user's: not ours to judge), False when it is gone or a zombie (exited,
    not yet reaped, so it writes nothing more). Raises nothing."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, ValueError, OverflowError):  # another user's, unreadable, no pid
        return True


def group_running(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running; zombies (exited,
    waiting to be reaped by a parent that may never do so) do not count. Raises nothing."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user; look closer
    for found in psutil.process_iter(["status"]):
        try:
            if os.getpgid(found.pid) == pgid and found.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):  # exited while we looked
            continue
    return False


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError):  # it exited meanwhile
        os.killpg(pgid, signum)
