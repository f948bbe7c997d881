"""A real `prefect server start` on 127.0.0.1 for tests and benchmarks, stopped on exit."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from graft.processes import env_with_this_python, start_in_own_session, stop_session


@contextmanager
def local_prefect_server(
    home: Path, env: dict[str, str] | None = None, timeout_s: float = 120
) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` on a free loopback port, with its SQLite database in ``home``.

    Yields the API URL and the environment for every process that should talk to it: ``env``
    (default: :func:`env_with_this_python`) plus PREFECT_HOME, the database and the API URL.
    The server is stopped on exit; its output is in ``home / "server.log"``. Raises
    RuntimeError, with that log, when the server exits or is not healthy within ``timeout_s``
    seconds.
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
