"""Placement on real components: a Prefect server, two process work pools, two clones, S3.

The orchestrating project is deployed to its own work pool ("graft", worker in its clone);
params.yaml places ``pretrain`` and ``baseline`` on a second pool, "gpu", whose worker runs in
a clone of its own (`graft worker gpu`). The DVC remote is a SeaweedFS bucket on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from deployed import Project, Server, deployed
from helpers import pipeline_is_current, poll_until, run
from object_store import ObjectStore, seaweedfs
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from flows.artifacts import artifact_key
from graft.processes import start_in_own_session, stop_session

pytestmark = pytest.mark.slow
PLACED = ("pretrain", "baseline")
POOL = "gpu"


@dataclass(frozen=True)
class Placed:
    project: Project
    store: ObjectStore
    worker_clone: Path


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Iterator[Placed]:
    base = tmp_path_factory.mktemp("placement")
    with seaweedfs(base / "seaweedfs") as store, deployed(base, server) as project:
        repo = project.repo
        store.add_dvc_remote(repo, prefix="dvc")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["run"]["placement"] = {stage: POOL for stage in PLACED}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", "pretrain and baseline on the gpu pool"], repo)
        clone = base / "gpu-clone"
        run(["git", "clone", "-q", str(repo), str(clone)], base)
        store.add_credentials(clone)
        command = ["graft", "worker", POOL, "--root", str(clone)]
        worker = start_in_own_session(command, server.env, base / "gpu-worker.log", base)
        try:
            poll_until(
                lambda: online_workers(server, POOL),
                bool,
                f"a worker of pool {POOL} to come online (log: {base / 'gpu-worker.log'})",
                timeout_s=120,
            )
            yield Placed(project, store, clone)
        finally:
            stop_session(worker)


def online_workers(server: Server, pool: str) -> int:
    with server.client() as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except (ObjectNotFound, PrefectHTTPStatusError):  # the worker creates its pool
            return 0
    return sum(worker.status == WorkerStatus.ONLINE for worker in workers)


def placed_runs(placed: Placed, parent: UUID) -> dict[str, FlowRun]:
    """The graft-stage runs the orchestrating run ``parent`` started, by stage."""
    with placed.project.server.client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[POOL])),
        )
    return {str(r.parameters["stage"]): r for r in runs}


def placed_key(placed: Placed, flow_run: FlowRun) -> str:
    """The key of the record a placed run publishes: its worker clone's stage work tree's."""
    return artifact_key(placed.worker_clone, f"placed-{flow_run.parameters['stage']}")


def record_of(placed: Placed, flow_run: FlowRun) -> dict[str, Any]:
    """What the placed run published about itself: where and when it ran."""
    with placed.project.server.client() as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[placed_key(placed, flow_run)]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
            )
        )
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(rows, list)
    return dict(rows[0])


def test_placed_stages_run_on_their_pool_at_once_and_the_lock_is_a_plain_repro(
    placed: Placed, tmp_path: Path
) -> None:
    project = placed.project
    flow_run_id = project.trigger("on-demand")
    finished = project.wait(flow_run_id)
    assert finished.state is not None and finished.state.is_completed(), finished.state
    children = placed_runs(placed, flow_run_id)
    assert set(children) == set(PLACED)
    records = {stage: record_of(placed, run_) for stage, run_ in children.items()}
    for stage, record in records.items():  # the worker's own clone ran them
        assert Path(record["workspace"]) == placed.worker_clone / ".graft" / "worktrees" / stage
        assert record["ran"] is True
    spans = [
        (datetime.fromisoformat(r["started"]), datetime.fromisoformat(r["ended"]))
        for r in records.values()
    ]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # overlap

    log = project.logs(flow_run_id, waiting_for="Stage 'baseline' is cached - skipping run")
    assert "Stage 'pretrain' is cached - skipping run" in log  # taken over, not run again
    assert "pretrain@gpu | " in log and "baseline@gpu | " in log  # relayed from the worker
    assert project.stages(flow_run_id)["pretrain"] == "ran"
    assert pipeline_is_current(project.repo)

    # The same commit and sources, run with a plain `dvc repro`: the same dvc.lock, entry by
    # entry (training is deterministic on one machine).
    plain = tmp_path / "plain"
    run(["git", "clone", "-q", str(project.repo), str(plain)], tmp_path)
    run(["dvc", "repro"], plain)
    expected = yaml.safe_load((plain / "dvc.lock").read_text())["stages"]
    recorded = yaml.safe_load((project.repo / "dvc.lock").read_text())["stages"]
    assert recorded == expected

    again = project.trigger("on-demand")
    assert project.wait(again).state.is_completed()  # type: ignore[union-attr]
    assert set(project.stages(again).values()) - {"ran"} == {"cached"}
    assert project.stages(again)["pretrain"] == "cached"
    assert placed_runs(placed, again) == {}  # nothing placed: DVC had it all


def test_uncommitted_changes_to_a_placed_stage_are_refused_before_any_work(
    placed: Placed,
) -> None:
    project = placed.project
    code = project.repo / "tasks" / "pretrain.py"
    original = code.read_text()
    code.write_text(original + "\n# an edit not committed\n")
    try:
        flow_run_id = project.trigger("on-demand", force=True)
        finished = project.wait(flow_run_id)
        assert finished.state is not None and finished.state.is_failed()
        log = project.logs(flow_run_id, waiting_for="uncommitted changes")
        assert "run.placement.pretrain: uncommitted changes to files it depends on: " in log
        assert "tasks/pretrain.py" in log
        assert placed_runs(placed, flow_run_id) == {}
    finally:
        code.write_text(original)


def test_a_stage_failing_on_the_worker_fails_the_run_with_its_stderr(placed: Placed) -> None:
    project = placed.project
    code = project.repo / "tasks" / "baseline.py"
    original = code.read_text()
    broken = "raise SystemExit('baseline broke here')\n\n\ndef main("
    code.write_text(original.replace("def main(", broken, 1))
    run(["git", "commit", "-q", "-am", "a baseline that fails"], project.repo)
    try:
        flow_run_id = project.trigger("on-demand")
        finished = project.wait(flow_run_id)
        assert finished.state is not None and finished.state.is_failed()
        # The run's state is final before its last log lines reach the server: wait for
        # the failure, which is logged last, then look for the relayed stderr before it.
        log = project.logs(flow_run_id, waiting_for="stage 'baseline' failed on work pool 'gpu'")
        assert "baseline broke here" in log
        assert "Running stage 'evaluate'" not in log  # downstream of it: never started
    finally:
        run(["git", "revert", "--no-edit", "HEAD"], project.repo)
