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
    """``base`` (default: this process's environment) with this interpreter's bin dir first."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_in_own_session(
    command: list[str], env: dict[str, str], log: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output in ``log``, in a session of its own, so that
    :func:`stop_session` stops it and everything it started."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_session(process: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    """SIGTERM the process's session; SIGKILL it if it is still there after ``wait_s``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
