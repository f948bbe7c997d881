"""Deployments on a real Prefect server: prefect.yaml, a process worker, schedules, `graft serve`.

A real `prefect server start` on 127.0.0.1 (temporary PREFECT_HOME and SQLite database) and a
real worker run the flow on a temporary git + DVC copy of the project with tiny params. The
tests are one story in order: deploy, a first run, a run with nothing new, two overlapping runs,
a schedule that picks up new images, a failing stage, then the same deployments served.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from helpers import DEMO, copy_demo_subset, make_dvc_project, poll_until, run, tool_env
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import SCHEDULE_TYPES, IntervalSchedule

from flows.local_server import local_prefect_server
from graft.processes import start_in_own_session, stop_session

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 900  # a full tiny pipeline takes well under a minute; CI machines can be slow


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]  # for every Prefect process that talks to this server

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.url)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        **tool_env(),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # A run held by the deployment's limit retries after this many seconds (default 30).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    }
    home = tmp_path_factory.mktemp("prefect-home")
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
                    key=ArtifactFilterKey(any_=["graft-stages"]),
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
                found = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                    limit=200,
                )
                return "\n".join(log.message for log in found)

            in_log = f"{waiting_for!r} in the run's log"
            return poll_until(read, lambda text: waiting_for in text, in_log, timeout_s=30)

    def all_stages(self) -> set[str]:
        """Every stage of dvc.yaml, as the dvc command lists them."""
        return set(run(["dvc", "stage", "list", "--name-only"], self.repo).stdout.split())

    def stale_stages(self) -> set[str]:
        """What `dvc status` says is out of date, before anything runs."""
        status = json.loads(run(["dvc", "status", "--json"], self.repo).stdout or "{}")
        return {name.split(":")[-1] for name in status}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_server: Server) -> Iterator[Project]:
    """The project deployed from its prefect.yaml to a process work pool, with a worker."""
    base = tmp_path_factory.mktemp("deployed")
    sources = copy_demo_subset(base / "sources", per_class=12)
    repo = make_dvc_project(base / "repo", sources, with_flows=True)
    env = prefect_server.env
    _prefect(["prefect", "work-pool", "create", "graft", "--type", "process"], repo, env)
    _prefect(["prefect", "--no-prompt", "deploy", "--all"], repo, env)
    worker = start_in_own_session(
        ["prefect", "worker", "start", "--pool", "graft"], env, base / "worker.log", repo
    )
    try:
        yield Project(repo, sources, prefect_server)
    finally:
        stop_session(worker)


def _prefect(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_prefect_yaml_deploys_a_nightly_schedule_and_an_on_demand_run(project: Project) -> None:
    with project.server.client() as client:
        nightly = client.read_deployment_by_name("graft-pipeline/nightly")
        on_demand = client.read_deployment_by_name("graft-pipeline/on-demand")
    (schedule,) = nightly.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")  # type: ignore[union-attr]
    assert on_demand.schedules == []
    for deployment in (nightly, on_demand):
        assert deployment.work_pool_name == "graft"
        assert deployment.global_concurrency_limit is not None
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options is not None
        assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert nightly.parameters["publish"] is True


def test_a_run_runs_exactly_what_dvc_reports_stale(project: Project) -> None:
    assert project.stale_stages() == project.all_stages()  # nothing has run yet
    flow_run = project.wait(project.trigger("on-demand"))
    assert flow_run.state is not None and flow_run.state.is_completed(), project.logs(flow_run.id)
    assert project.stages(flow_run.id) == dict.fromkeys(project.all_stages(), "ran")
    assert project.stale_stages() == set()
    assert "Running stage" not in run(["dvc", "repro"], project.repo).stdout  # shared cache


def test_a_run_with_nothing_new_is_all_cached(project: Project) -> None:
    flow_run = project.wait(project.trigger("on-demand"))
    assert flow_run.state is not None and flow_run.state.is_completed()
    assert project.stages(flow_run.id) == dict.fromkeys(project.all_stages(), "cached")
    expected = "register: up to date (DVC cache)"
    assert expected in project.logs(flow_run.id, waiting_for=expected)


def test_overlapping_runs_wait_their_turn(project: Project) -> None:
    first, second = project.trigger("on-demand"), project.trigger("on-demand")
    runs = [project.wait(first), project.wait(second)]
    assert all(r.state is not None and r.state.is_completed() for r in runs)
    earlier, later = sorted(runs, key=lambda r: r.start_time or datetime.max.replace(tzinfo=UTC))
    assert earlier.end_time is not None and later.start_time is not None
    assert later.start_time >= earlier.end_time  # never in parallel
    with project.server.client() as client:
        states = [s.name for s in client.read_flow_run_states(later.id)]
    assert "AwaitingConcurrencySlot" in states  # held by the deployment's limit


def test_a_schedule_picks_up_new_images(project: Project) -> None:
    target = project.sources / "target" / "7"
    new_images = sorted((DEMO / "target" / "7").glob("digit-*.png"))[20:23]
    for image in new_images:
        shutil.copy2(image, target / image.name)
    assert project.stale_stages() == {"ingest"}  # what DVC can see before anything runs

    # An interval schedule whose next run is due in a few seconds: the server's scheduler,
    # not the test, creates the run.
    interval = timedelta(hours=1)
    due = datetime.now(UTC) + timedelta(seconds=3)
    schedule: SCHEDULE_TYPES = IntervalSchedule(interval=interval, anchor_date=due - interval)
    with project.server.client() as client:
        deployment = client.read_deployment_by_name("graft-pipeline/on-demand")
        (created,) = client.create_deployment_schedules(deployment.id, [(schedule, True)])
        scheduled = _first_scheduled_run(client, deployment.id)
    flow_run = project.wait(scheduled.id)
    _prefect(
        ["prefect", "deployment", "schedule", "pause", "graft-pipeline/on-demand", str(created.id)],
        project.repo,
        project.server.env,
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), project.logs(flow_run.id)
    assert project.stages(flow_run.id) == dict.fromkeys(
        project.all_stages(), "ran"
    )  # the data changed
    manifest = (project.repo / "data" / "ingested" / "manifest.csv").read_text()
    assert all(f"7/{image.name}" in manifest for image in new_images)
    assert project.stale_stages() == set()


def _first_scheduled_run(client: SyncPrefectClient, deployment_id: UUID) -> FlowRun:
    def scheduled() -> list[FlowRun]:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        )
        return [r for r in runs if r.auto_scheduled and r.expected_start_time is not None]

    auto = poll_until(scheduled, bool, "the scheduler to create a run", 60)
    return min(auto, key=lambda r: str(r.expected_start_time))  # ISO times sort


def test_a_failing_stage_fails_the_run_and_stops_downstream(project: Project) -> None:
    evaluate = project.repo / "tasks" / "evaluate.py"
    original = evaluate.read_text()
    evaluate.write_text(original + "\nraise SystemExit('evaluation exploded')\n")
    try:
        flow_run = project.wait(project.trigger("on-demand"))
    finally:
        evaluate.write_text(original)
    assert flow_run.state is not None and flow_run.state.is_failed()
    expected = "evaluate | evaluation exploded"  # the stage's own stderr, line by line
    assert expected in project.logs(flow_run.id, waiting_for=expected)
    with project.server.client() as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs if t.state}
    assert states["evaluate"] == "Failed"
    assert "register" not in states  # downstream never started


def test_graft_serve_serves_the_same_deployments_without_a_worker(project: Project) -> None:
    # Switch this workspace from the work pool to serving: remove the pool's deployments.
    with project.server.client() as client:
        for name in ("nightly", "on-demand"):
            client.delete_deployment(client.read_deployment_by_name(f"graft-pipeline/{name}").id)
    log = project.repo.parent / "serve.log"
    serve = _serve(project, log)
    try:
        with project.server.client() as client:
            served = client.read_deployment_by_name("graft-pipeline/on-demand")
        assert served.work_pool_name is None  # run by the serving process, not by a worker
        # The failed evaluate of the test before left its outputs removed, as DVC does.
        stale = project.stale_stages()
        flow_run = project.wait(project.trigger("on-demand"))
        assert flow_run.state is not None and flow_run.state.is_completed(), log.read_text()
        ran = {stage for stage, status in project.stages(flow_run.id).items() if status == "ran"}
        assert ran == stale
        with project.server.client() as client:
            nightly = client.read_deployment_by_name("graft-pipeline/nightly")
        assert nightly.schedules[0].schedule.cron == "0 2 * * *"  # type: ignore[union-attr]
    finally:
        stop_session(serve)  # SIGTERM, as a service manager stops it
    assert serve.returncode == 0, log.read_text()  # a graceful shutdown
    assert not _nightly_schedule_active(project)  # paused while nothing serves it
    serve = _serve(project, log)  # serving again: the schedule is back
    stop_session(serve)  # at once: a stop while the runner is still starting is graceful too
    assert serve.returncode == 0, log.read_text()
    assert not _nightly_schedule_active(project)


def _serve(project: Project, log: Path) -> subprocess.Popen[bytes]:
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
    assert _nightly_schedule_active(project)
    return serve


def _nightly_schedule_active(project: Project) -> bool:
    with project.server.client() as client:
        (schedule,) = client.read_deployment_by_name("graft-pipeline/nightly").schedules
    return schedule.active
