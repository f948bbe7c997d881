"""A real `prefect server start` on 127.0.0.1, stopped on exit: for tests and benchmarks, and
for `graft run` without PREFECT_API_URL (a temporary server in a session of its own, so that it
outlives a terminal's Ctrl-C long enough to record how the run ended)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from graft.processes import env_with_this_python, start_in_own_session, stop_session

# Seconds for a temporary server to stop, and for each kind of queued item (logs, events) to
# be sent before it does: an interrupted run must exit within 10 s in all.
STOP_WAIT_S = 2.0


class ServerDidNotStart(RuntimeError):
    """`prefect server start` exited, or was not healthy in time; the message holds its log."""


@contextmanager
def local_prefect_server(
    home: Path | None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    *,
    log: Path | None = None,
    stop_wait_s: float = 30,
) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` on a free loopback port, in a session of its own (a terminal's
    Ctrl-C does not reach it; whoever started it stops it), stopped on exit.

    ``home``: the server's PREFECT_HOME, holding its SQLite database (tests, benchmarks); None
    leaves PREFECT_HOME and the database as ``env`` sets them (a user's, as Prefect's own
    temporary server does). ``env`` (default: :func:`env_with_this_python`) is the base of the
    environment. Yields the API URL and the environment for every process that should talk
    to the server: ``env`` plus PREFECT_API_URL (and PREFECT_HOME and the database with
    ``home``). The server's output goes to ``log`` (default ``home / "server.log"``; needed
    when ``home`` is None). On exit the server gets SIGTERM, and SIGKILL after
    ``stop_wait_s`` seconds. Raises ServerDidNotStart (a RuntimeError), with that log, when the
    server exits or is not healthy within ``timeout_s`` seconds, and ValueError without
    ``home`` or ``log``.
    """
    if log is None:
        if home is None:
            raise ValueError("local_prefect_server needs a log file when home is None")
        log = home / "server.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls from a sandbox
        **(env_with_this_python() if env is None else env),
        "PREFECT_API_URL": url,
    }
    if home is not None:
        env["PREFECT_HOME"] = str(home)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # The UI it serves asks for its API at PREFECT_SERVER_UI_API_URL, by default on port 4200
    # whatever --port says: point it at this server, or its pages find no API.
    server_env = env | {"PREFECT_SERVER_UI_API_URL": url}
    server = start_in_own_session(command, server_env, log, cwd=log.parent)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise ServerDidNotStart(f"prefect server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url, env
    finally:
        stop_session(server, stop_wait_s)


@contextmanager
def run_api(log: Path, announce: Callable[[str], None]) -> Iterator[str | None]:
    """The Prefect API for flow runs in this process: PREFECT_API_URL's (environment or
    profile) when set, otherwise a temporary :func:`local_prefect_server` that this process's
    Prefect settings point at until exit, then stopped. That server keeps the user's
    PREFECT_HOME and database (its runs stay in their history, as those of Prefect's own
    temporary server do) but runs no scheduler or late-runs service: it is this run's alone.

    ``log`` receives the server's output; ``announce`` is called with one line saying a
    temporary server is used, before it starts (it takes seconds). Yields the temporary
    server's API URL, or None when PREFECT_API_URL is set. On exit the logs and events this
    process has queued are sent first, so the run's final state and logs reach the server.
    Raises ServerDidNotStart when the server does not start.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    announce(
        "PREFECT_API_URL is not set: starting a temporary Prefect server for this run "
        f"(its history stays in {PREFECT_HOME.value()}; for a lasting one, start "
        "`prefect server start` and set PREFECT_API_URL)"
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **env_with_this_python(),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    }
    with local_prefect_server(None, env, log=log, stop_wait_s=STOP_WAIT_S) as (url, _):
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                yield url
        finally:
            _send_queued_logs_and_events()


def _send_queued_logs_and_events() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=STOP_WAIT_S)
    EventsWorker.drain_all(timeout=STOP_WAIT_S)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
