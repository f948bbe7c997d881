"""A real Prefect server, a deployed copy of the project and its worker, for deployment tests.

Each test module that needs a server starts one (``prefect_server`` in a module fixture) and
deploys one project to it (``deployed``): a temporary git + DVC copy of the project with tiny
params, prefect.yaml deployed to a process work pool with one worker.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from helpers import copy_demo_subset, make_dvc_project, poll_until, run, tool_env
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun

from flows.artifacts import artifact_key
from flows.local_server import local_prefect_server
from graft.processes import start_in_own_session, stop_session

RUN_TIMEOUT_S = 900  # a full tiny pipeline takes well under a minute; CI machines can be slow


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]  # for every Prefect process that talks to this server

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.url)


@contextmanager
def prefect_server(home: Path) -> Iterator[Server]:
    """A real `prefect server start` on 127.0.0.1 with its database in ``home``, its
    scheduler and workers polling every second or two so that tests wait little."""
    env = {
        **tool_env(),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # A run held by the deployment's limit retries after this many seconds (default 30).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    with local_prefect_server(home, env) as (url, server_env):
        yield Server(url, server_env)


@dataclass(frozen=True)
class Project:
    repo: Path
    sources: Path
    server: Server

    def trigger(self, deployment: str, **parameters: Any) -> UUID:
        with self.server.client() as client:
            found = client.read_deployment_by_name(f"graft-pipeline/{deployment}")
            run_ = client.create_flow_run_from_deployment(found.id, parameters=parameters)
            return run_.id

    def wait(self, flow_run_id: UUID, timeout_s: float = RUN_TIMEOUT_S) -> FlowRun:
        with self.server.client() as client:
            return poll_until(
                lambda: client.read_flow_run(flow_run_id),
                lambda run_: run_.state is not None and run_.state.is_final(),
                f"flow run {flow_run_id} to finish",
                timeout_s,
                describe=lambda run_: f"state {run_.state}",
            )

    def stages(self, flow_run_id: UUID) -> dict[str, str]:
        """The run's stage table artifact, as the UI shows it: stage -> ran | cached."""
        with self.server.client() as client:
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[artifact_key(self.repo, "stages")]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                )
            )
        data = artifact.data
        rows = json.loads(data) if isinstance(data, str) else data
        assert isinstance(rows, list), rows
        return {row["stage"]: row["status"] for row in rows}

    def logs(self, flow_run_id: UUID, waiting_for: str = "") -> str:
        """The run's log; logs reach the server in batches, so wait up to 30 s for
        ``waiting_for`` to be in it (an AssertionError showing the log if it never is)."""
        with self.server.client() as client:

            def read() -> str:
                lines: list[str] = []
                while True:  # the server answers at most 200 lines at a time
                    page = client.read_logs(
                        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                        limit=200,
                        offset=len(lines),
                    )
                    lines += [log.message for log in page]
                    if len(page) < 200:
                        return "\n".join(lines)

            in_log = f"{waiting_for!r} in the run's log"
            return poll_until(read, lambda text: waiting_for in text, in_log, timeout_s=30)

    def all_stages(self) -> set[str]:
        """Every stage of dvc.yaml, as the dvc command lists them."""
        return set(run(["dvc", "stage", "list", "--name-only"], self.repo).stdout.split())

    def stale_stages(self) -> set[str]:
        """What `dvc status` says is out of date, before anything runs: always the scan stage
        (dvc.yaml's ``always_changed`` one) among them, even when all else is up to date
        (helpers.pipeline_is_current); DVC cannot see a change of the source folders, which
        only the scan looks at (graft.registry.publish.stale_stages can)."""
        status = json.loads(run(["dvc", "status", "--json"], self.repo).stdout or "{}")
        return {name.split(":")[-1] for name in status}


@contextmanager
def deployed(base: Path, prefect_server: Server) -> Iterator[Project]:
    """A copy of the project in ``base`` deployed from its prefect.yaml to a process work
    pool, with a worker (stopped on exit; its log is ``base / "worker.log"``)."""
    sources = copy_demo_subset(base / "sources", per_class=12)
    repo = make_dvc_project(base / "repo", sources, with_flows=True)
    env = prefect_server.env
    prefect_cli(["prefect", "work-pool", "create", "graft", "--type", "process"], repo, env)
    prefect_cli(["prefect", "--no-prompt", "deploy", "--all"], repo, env)
    worker = start_in_own_session(
        ["prefect", "worker", "start", "--pool", "graft"], env, base / "worker.log", repo
    )  # the worker's log: base / "worker.log"
    try:
        yield Project(repo, sources, prefect_server)
    finally:
        stop_session(worker)


def prefect_cli(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def first_scheduled_run(client: SyncPrefectClient, deployment_id: UUID) -> FlowRun:
    def scheduled() -> list[FlowRun]:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        )
        return [r for r in runs if r.auto_scheduled and r.expected_start_time is not None]

    auto = poll_until(scheduled, bool, "the scheduler to create a run", 60)
    return min(auto, key=lambda r: str(r.expected_start_time))  # ISO times sort


def serve_in_background(project: Project, log: Path) -> subprocess.Popen[bytes]:
    """`graft serve` for the project, once it reports its deployments served."""
    command = ["graft", "serve", "--root", str(project.repo)]
    serve = start_in_own_session(command, project.server.env, log, cwd=project.repo)

    def serve_log() -> str:
        text = log.read_text()
        assert "being served" in text or serve.poll() is None, f"graft serve exited:\n{text}"
        return text

    poll_until(
        serve_log,
        lambda text: "being served" in text,
        "graft serve to announce its deployments",
        timeout_s=120,
        interval_s=0.1,  # often: a caller may stop it at once, while the runner is starting
    )
    assert nightly_schedule_active(project)
    return serve


def nightly_schedule_active(project: Project) -> bool:
    with project.server.client() as client:
        (schedule,) = client.read_deployment_by_name("graft-pipeline/nightly").schedules
    return schedule.active
