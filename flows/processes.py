"""Child processes: this environment's tools first on PATH, and a local Prefect server.

The flow runs `dvc` (whose stages run `python`); tests and benchmarks also start a real
`prefect server start` on 127.0.0.1. Both must use this environment's executables, as a user
with the environment activated would. Nothing here imports Prefect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


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


@contextmanager
def local_prefect_server(
    home: Path, env: dict[str, str] | None = None, timeout_s: float = 120
) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` on a free loopback port, with its SQLite database in ``home``.

    Yields the API URL and the environment for every process that should talk to it: ``env``
    (default: :func:`env_with_this_python`) plus PREFECT_HOME, the database and the API URL.
    The server is stopped on exit; its output is in ``home / "server.log"``.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls from a sandbox
        **(env_with_this_python() if env is None else env),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    log = home / "server.log"
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start_in_own_session(command, env, log, cwd=home)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, env
    finally:
        stop_session(server)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
