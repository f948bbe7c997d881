"""Deployments survive faults on a real Prefect server, with nobody touching the server.

One story in order, on one deployed copy of the project (tests/deployed.py): nights missed while
no worker ran (only the latest runs); a machine crash mid-`pretrain` (the dead run is marked
Crashed, its slot freed, the next run resumes `pretrain` and publishes without a DVC remote);
`graft serve` stopped with SIGTERM mid-stage (the run is Crashed at once, its stage stopped, and
the next serve runs it again).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml
from deployed import (
    Project,
    Server,
    deployed,
    first_scheduled_run,
    prefect_cli,
    serve_in_background,
)
from helpers import pipeline_is_current, poll_until, run
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import SCHEDULE_TYPES, IntervalSchedule

from flows.crash_detection import AUTOMATION, SILENCE_S
from graft.processes import start_in_own_session, stop_session

pytestmark = pytest.mark.slow

# The bound the README promises from a crash to the next run starting, with Prefect's default
# server settings (flows/crash_detection.py); this server asks for slots every 2 s, not 30.
NEXT_RUN_BOUND_S = 120


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Iterator[Project]:
    """The project deployed with a `pretrain` long enough to be killed in its middle."""
    base = tmp_path_factory.mktemp("deployed")
    with deployed(base, server) as project:
        params_path = project.repo / "params.yaml"
        params = yaml.safe_load(params_path.read_text())
        params["pretrain"].update(epochs=30, patience=1000)  # tens of seconds, never stops early
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "commit", "-qam", "a longer pretrain"], project.repo)
        yield project


def test_missed_scheduled_runs_run_only_the_latest(project: Project) -> None:
    pool = ["prefect", "work-pool"]
    prefect_cli([*pool, "pause", "graft"], project.repo, project.server.env)  # nothing runs
    interval = timedelta(seconds=4)
    schedule: SCHEDULE_TYPES = IntervalSchedule(interval=interval, anchor_date=datetime.now(UTC))
    with project.server.client() as client:
        deployment = client.read_deployment_by_name("graft-pipeline/on-demand")
        (created,) = client.create_deployment_schedules(deployment.id, [(schedule, True)])
        first_scheduled_run(client, deployment.id)
        time.sleep(3 * interval.total_seconds() + 2)  # three or more times come and go
        client.update_deployment_schedule(deployment.id, created.id, active=False)
        for future in _scheduled_runs(client, deployment.id, due=False):
            client.delete_flow_run(future.id)  # not missed: must not run later in this story
        missed = _scheduled_runs(client, deployment.id, due=True)
    assert len(missed) >= 3, missed
    prefect_cli([*pool, "resume", "graft"], project.repo, project.server.env)
    finished = [project.wait(r.id) for r in missed]
    latest = max(finished, key=lambda r: r.expected_start_time or datetime.min)
    for flow_run in finished:
        assert flow_run.state is not None
        if flow_run.id == latest.id:
            assert flow_run.state.is_completed(), project.logs(flow_run.id)
        else:  # skipped before any work, saying why
            assert flow_run.state.is_cancelled(), flow_run.state
            assert "superseded" in (flow_run.state.message or ""), flow_run.state.message
    assert pipeline_is_current(project.repo)  # the latest ran the pipeline


def test_a_crashed_run_frees_its_slot_and_the_next_run_resumes_and_publishes(
    project: Project,
) -> None:
    _retrain(project, epochs=35)  # pretrain is stale: no cached result to take its place
    dead = project.trigger("nightly")
    _wait_for_resume_state(project.repo, "pretrain")
    worker_log = project.repo.parent / "worker.log"
    _crash_machine(project.repo, worker_log)  # the worker, the flow run and its stage, at once
    crashed_at = time.monotonic()

    worker = start_in_own_session(
        ["prefect", "worker", "start", "--pool", "graft"],
        project.server.env,
        project.repo.parent / "worker-2.log",
        project.repo,
    )
    try:
        triggered_at = time.monotonic()
        after = project.trigger("nightly")  # pull, push and publish, as scheduled
        with project.server.client() as client:
            started = poll_until(
                lambda: client.read_flow_run(after),
                lambda r: r.state is not None and (r.state.is_running() or r.state.is_final()),
                "the run after the crash to start, with nobody cancelling anything",
                timeout_s=NEXT_RUN_BOUND_S + 60,
            )
        waited_s = time.monotonic() - triggered_at
        print(
            f"next run started {waited_s:.0f} s after it was triggered, "
            f"{time.monotonic() - crashed_at:.0f} s after the crash"
        )
        assert waited_s < NEXT_RUN_BOUND_S, f"started after {waited_s:.0f} s"
        assert started.state is not None
        finished = project.wait(after)
        assert finished.state is not None and finished.state.is_completed(), project.logs(after)
        log = project.logs(after, waiting_for="@v1.0.0 at commit")
        assert "pretrain | pretrain: resuming after epoch" in log  # the crashed run's epochs
        assert "no DVC remote configured" in log
        with project.server.client() as client:
            dead_run = client.read_flow_run(dead)
        assert dead_run.state is not None and dead_run.state.is_crashed(), dead_run.state
        assert f"no heartbeat for {SILENCE_S} s" in (dead_run.state.message or "")
        tags = run(["git", "tag", "--list"], project.repo).stdout.split()
        assert [tag for tag in tags if tag.endswith("@v1.0.0")], tags  # GTO's <model>@<version>
        assert pipeline_is_current(project.repo)
        with project.server.client() as client:
            assert len(client.read_automations_by_name(AUTOMATION)) == 1
    finally:
        stop_session(worker)


def test_sigterm_to_graft_serve_ends_its_run_and_stops_its_stage(project: Project) -> None:
    with project.server.client() as client:  # serve instead of the pool's worker
        for name in ("nightly", "on-demand"):
            client.delete_deployment(client.read_deployment_by_name(f"graft-pipeline/{name}").id)
    log = project.repo.parent / "serve.log"
    _retrain(project, epochs=40)
    serve = serve_in_background(project, log)
    try:
        stopped = project.trigger("on-demand", stages=["pretrain"])  # and what it needs
        _wait_for_resume_state(project.repo, "pretrain")
        signalled = time.monotonic()
        serve.send_signal(signal.SIGTERM)  # the service manager's stop, to serve alone
        serve.wait(timeout=60)
        exit_s = time.monotonic() - signalled
    finally:
        stop_session(serve)
    print(f"graft serve exited {exit_s:.1f} s after SIGTERM")
    assert serve.returncode == 0, log.read_text()
    assert exit_s < 10, log.read_text()
    left = [p for p in _processes_in(project.repo) if "worker" not in p.cmdline()]  # the pool's
    assert left == [], "a process of the stopped run is left"
    with project.server.client() as client:
        state = client.read_flow_run(stopped).state
    assert state is not None and (state.is_crashed() or state.is_cancelled()), state

    serve = serve_in_background(project, log)  # serving again: the next run is not held
    try:
        again = project.wait(project.trigger("on-demand", stages=["pretrain"]))
        assert again.state is not None and again.state.is_completed(), project.logs(again.id)
        assert "pretrain: resuming after epoch" in project.logs(again.id, "resuming after epoch")
    finally:
        stop_session(serve)


def _scheduled_runs(client: SyncPrefectClient, deployment_id: UUID, due: bool) -> list[FlowRun]:
    """The deployment's runs made by its schedule: those due by now, or those still to come."""
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    now = datetime.now(UTC)
    return [
        r for r in runs
        if r.auto_scheduled and r.expected_start_time and (r.expected_start_time <= now) == due
    ]  # fmt: skip


def _retrain(project: Project, epochs: int) -> None:
    """Commit a change of ``pretrain.epochs``: the next run trains pretrain and what follows."""
    params_path = project.repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["pretrain"]["epochs"] = epochs
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", f"pretrain for {epochs} epochs"], project.repo)


def _wait_for_resume_state(repo: Path, stage: str) -> None:
    """Until the stage has saved at least one finished epoch (its resume state)."""
    folder = repo / ".graft" / "resume" / stage
    poll_until(
        lambda: sorted(folder.rglob("*.pt")) if folder.exists() else [],
        bool,
        f"{stage} to save an epoch's resume state",
        timeout_s=600,
        interval_s=0.2,
    )


def _processes_in(repo: Path) -> list[psutil.Process]:
    """Every live process working in ``repo`` or below it (a stage's work tree): a flow run,
    `dvc`, a stage."""
    found = []
    for process in psutil.process_iter():
        try:
            inside = Path(process.cwd()).is_relative_to(repo)
            if inside and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone, or not ours
            continue
    return found


def _crash_machine(repo: Path, worker_log: Path) -> None:
    """SIGKILL every process working in ``repo`` (the worker, the flow run, `dvc`, the stage),
    as a power cut would: nothing gets to report, release or clean up anything."""
    victims = _processes_in(repo)
    assert any("tasks.pretrain" in " ".join(p.cmdline()) for p in victims), worker_log.read_text()
    for process in victims:
        with suppress(ProcessLookupError):  # exited since the listing
            os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
