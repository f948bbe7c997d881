"""Deployments on a real Prefect server: prefect.yaml, a process worker, schedules, `graft serve`.

A real `prefect server start` on 127.0.0.1 (temporary PREFECT_HOME and SQLite database) and a
real worker run the flow on a temporary git + DVC copy of the project with tiny params. The
tests are one story in order: deploy, a first run, a run with nothing new, two overlapping runs,
a schedule that picks up new images, a failing stage, then the same deployments served.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from deployed import (
    Project,
    Server,
    deployed,
    first_scheduled_run,
    nightly_schedule_active,
    prefect_cli,
    serve_in_background,
)
from helpers import DEMO, SCAN_STAGE, pipeline_is_current, run
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.schedules import SCHEDULE_TYPES, IntervalSchedule

from graft.config.params import load_params
from graft.processes import stop_session
from graft.registry.publish import stale_stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Iterator[Project]:
    """The project deployed from its prefect.yaml to a process work pool, with a worker."""
    with deployed(tmp_path_factory.mktemp("deployed"), server) as project:
        yield project


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
    assert SCAN_STAGE in project.all_stages()
    assert project.stale_stages() == project.all_stages()  # nothing has run yet
    flow_run = project.wait(project.trigger("on-demand"))
    assert flow_run.state is not None and flow_run.state.is_completed(), project.logs(flow_run.id)
    assert project.stages(flow_run.id) == dict.fromkeys(project.all_stages(), "ran")
    assert pipeline_is_current(project.repo)
    by_hand = run(["dvc", "repro"], project.repo).stdout  # shared cache: only the scan runs
    assert re.findall(r"Running stage '([\w-]+)'", by_hand) == [SCAN_STAGE]


def test_a_run_with_nothing_new_is_all_cached(project: Project) -> None:
    flow_run = project.wait(project.trigger("on-demand"))
    assert flow_run.state is not None and flow_run.state.is_completed()
    # The scan always runs (dvc.yaml: always_changed); it finds the sources as they were.
    cached = dict.fromkeys(project.all_stages() - {SCAN_STAGE}, "cached")
    assert project.stages(flow_run.id) == {SCAN_STAGE: "ran", **cached}
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
    # Before anything runs, DVC sees only the scan, which it always reports; graft (what
    # `graft publish` asks) sees that the scan would find the source folders changed.
    assert project.stale_stages() == {SCAN_STAGE}
    params = load_params(project.repo / "params.yaml")
    assert set(stale_stages(project.repo, params)) == {SCAN_STAGE}

    # An interval schedule whose next run is due in a few seconds: the server's scheduler,
    # not the test, creates the run. The scheduler only creates runs still ahead of it: one
    # that looks after `due` (a busy machine, its 2 s loop) makes the next one, an hour on,
    # so `due` leaves it ample time, and a miss fails at once rather than after RUN_TIMEOUT_S.
    interval = timedelta(hours=1)
    due = datetime.now(UTC) + timedelta(seconds=15)
    schedule: SCHEDULE_TYPES = IntervalSchedule(interval=interval, anchor_date=due - interval)
    with project.server.client() as client:
        deployment = client.read_deployment_by_name("graft-pipeline/on-demand")
        (created,) = client.create_deployment_schedules(deployment.id, [(schedule, True)])
        scheduled = first_scheduled_run(client, deployment.id)
    expected = scheduled.expected_start_time
    assert expected is not None and expected < due + timedelta(minutes=1), (
        f"the scheduler looked after the run was due ({due}) and scheduled {expected}"
    )
    flow_run = project.wait(scheduled.id)
    prefect_cli(
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
    assert pipeline_is_current(project.repo)


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
    serve = serve_in_background(project, log)
    try:
        with project.server.client() as client:
            served = client.read_deployment_by_name("graft-pipeline/on-demand")
        assert served.work_pool_name is None  # run by the serving process, not by a worker
        # What the failed evaluate of the test before left stale (its exit, appended after
        # main(), comes once its outputs are written), and the scan, which always runs.
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
    assert not nightly_schedule_active(project)  # paused while nothing serves it
    serve = serve_in_background(project, log)  # serving again: the schedule is back
    stop_session(serve)  # at once: a stop while the runner is still starting is graceful too
    assert serve.returncode == 0, log.read_text()
    assert not nightly_schedule_active(project)
