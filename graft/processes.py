"""Child processes: this environment's tools first on PATH, sessions that stop whole.

The flow runs `dvc` (whose stages run `python`), publish runs `dvc status` and `dvc push`; tests
and benchmarks start servers and workers. All must use this environment's executables, as a
user with the environment activated would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


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


def stop_session(process: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    """Stop a process started by :func:`start_in_own_session`, with everything it started.

    SIGTERM to its whole session, then SIGKILL if the process has not exited after ``wait_s``
    seconds. Waits for it, so ``process.returncode`` is set on return; a process that had
    already exited is left alone. Raises nothing for a session that is already gone.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
