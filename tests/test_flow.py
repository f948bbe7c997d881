"""The Prefect flow runs DVC's stages as tasks and shares DVC's cache with `dvc repro`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from helpers import SCAN_STAGE, pipeline_is_current, run
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import State
from prefect.testing.utilities import prefect_test_harness

from flows import stages
from flows.artifacts import artifact_key, workspace_label
from flows.pipeline import pipeline
from flows.stages import DvcLocked, StageFailed, StageResult, stage_order
from flows.workspace import WorkspaceBusy, workspace_lock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    # A temporary Prefect API on a temporary SQLite database; no scheduler is needed here.
    with prefect_test_harness(server_startup_timeout=60):
        yield


def results(returned: list[StageResult] | State[None]) -> list[StageResult]:
    """The flow's stage results: a run started by hand is never skipped (flows/missed_runs.py)."""
    assert isinstance(returned, list), returned
    return returned


def ran(returned: list[StageResult] | State[None]) -> list[str]:
    return [r.stage for r in results(returned) if r.ran]


def dvc_dag(repo: Path, *targets: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Stages and (upstream, downstream) edges as the `dvc dag` command reports them."""
    dot = run(["dvc", "dag", "--dot", *targets], repo).stdout
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    return set(re.findall(r'^"([^"]+)";$', dot, flags=re.MULTILINE)), edges


def test_stage_order_comes_from_dvc(dvc_project: Path) -> None:
    for targets in ([], ["split"], ["evaluate"]):
        names, edges = dvc_dag(dvc_project, *targets)
        order = stage_order(dvc_project, targets or None)
        assert sorted(order) == sorted(names)  # each stage once; with targets, their upstream
        assert len(edges) >= len(names) - 1  # the dot output was parsed: a connected graph
        for upstream, downstream in edges:  # every stage after all of its dependencies
            assert order.index(upstream) < order.index(downstream), (upstream, downstream)
    assert "register" not in stage_order(dvc_project, ["evaluate"])  # downstream left out
    assert stage_order(dvc_project, ["split"]) == [SCAN_STAGE, "ingest", "split"]
    assert stage_order(dvc_project, [SCAN_STAGE]) == [SCAN_STAGE]  # the first: nothing upstream
    with pytest.raises(ValueError, match=r"no such stage in dvc\.yaml: trian"):
        stage_order(dvc_project, ["trian"])


def test_flow_and_dvc_repro_share_one_cache(dvc_project: Path, tmp_path: Path) -> None:
    repo = dvc_project
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    every_stage = stage_order(repo)
    first = pipeline(root=str(repo), push=True)
    assert [r.stage for r in results(first)] == every_stage and ran(first) == every_stage
    dry_run = run(["dvc", "repro", "--dry", "--force"], repo).stdout  # outputs exist now
    assert every_stage == re.findall(r"Running stage '([\w-]+)'", dry_run)  # `dvc repro`'s order
    assert "in sync" in run(["dvc", "status", "--cloud"], repo).stdout  # pushed
    assert pipeline_is_current(repo)
    by_hand = run(["dvc", "repro"], repo).stdout  # by hand: only the scan, which always runs
    assert re.findall(r"Running stage '([\w-]+)'", by_hand) == [SCAN_STAGE]

    # Every task but the scan's: up to date (DVC cache), and Cached in Prefect's terms.
    state = pipeline(root=str(repo), return_state=True)
    again = state.result()
    assert [r.stage for r in results(again)] == every_stage and ran(again) == [SCAN_STAGE]
    assert state.state_details.flow_run_id is not None
    finals = {
        name.rsplit("-", 1)[0]: names[-1]
        for name, names in _task_run_states(state.state_details.flow_run_id).items()
    }
    assert finals == {
        stage: "Completed" if stage == SCAN_STAGE else "Cached" for stage in every_stage
    }

    # publish: the model becomes a version; a run with nothing new publishes nothing.
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "first run"], repo)
    assert ran(pipeline(root=str(repo), publish=True, publish_stage="dev")) == [SCAN_STAGE]
    tags = run(["git", "tag", "--list"], repo).stdout.split()
    assert sorted(tags) == ["digits-5-9#dev#1", "digits-5-9@v1.0.0"]  # GTO's tag formats
    pipeline(root=str(repo), publish=True)
    assert run(["git", "tag", "--list"], repo).stdout.split() == tags

    params = (repo / "params.yaml").read_text().replace("name: digits-5-9", "name: digits-b")
    (repo / "params.yaml").write_text(params)
    by_hand = run(["dvc", "repro"], repo).stdout  # by hand: register only (after the scan)
    assert re.findall(r"Running stage '([\w-]+)'", by_hand) == [SCAN_STAGE, "register"]
    assert ran(pipeline(root=str(repo))) == [SCAN_STAGE]


def test_failing_stage_fails_the_flow_and_stops_downstream(dvc_project: Path) -> None:
    repo = dvc_project
    evaluate = repo / "tasks" / "evaluate.py"
    evaluate.write_text(evaluate.read_text() + "\nraise SystemExit('evaluation exploded')\n")
    state = pipeline(root=str(repo), return_state=True)
    reason = (
        "stage 'evaluate' failed: its last output: evaluation exploded (its command exited with 1)"
    )
    with pytest.raises(StageFailed) as failure:
        state.result()
    assert str(failure.value) == reason  # one line: the stage's output is in the log above
    assert (repo / "models" / "finetuned.pt").exists()  # upstream stages ran
    assert not (repo / "models" / "package").exists()  # register never ran

    # The run explains itself in the UI: its name and tags say which workspace; the stage
    # table says what failed and what never ran; the summary says why, first.
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert flow_run.name.startswith(f"{repo.name}-")
    assert {"graft", f"workspace:{workspace_label(repo)}"} <= set(flow_run.tags)
    artifacts = {a.key: a for a in found}
    expected = {artifact_key(repo, name) for name in ("stages", "summary", "ingest-summary")}
    assert expected <= set(artifacts)
    assert artifact_key(repo, "test-metrics") not in artifacts  # evaluate did not finish
    rows: Any = artifacts[artifact_key(repo, "stages")].data
    table: list[dict[str, Any]] = json.loads(rows) if isinstance(rows, str) else rows
    status = {row["stage"]: row["status"] for row in table}
    assert status["evaluate"] == "failed"
    assert [stage for stage, said in status.items() if said == "not run"] == ["figures", "register"]
    assert status["finetune"] == "ran"
    summary = str(artifacts[artifact_key(repo, "summary")].data)
    assert summary.startswith(f"# graft run: failed\n\n**Why:** {reason}\n")
    assert "Not run (downstream of the failure): figures, register." in summary
    assert "Test accuracy" not in summary  # evaluate did not finish: an older report is not shown


def _set_param(repo: Path, old: str, new: str) -> None:
    text = (repo / "params.yaml").read_text()
    assert old in text
    (repo / "params.yaml").write_text(text.replace(old, new))


def test_stage_past_its_timeout_is_killed_with_its_process_tree(dvc_project: Path) -> None:
    repo = dvc_project
    _set_param(repo, "default: 3600", "default: 3600\n    ingest: 0.5")
    with pytest.raises(StageFailed, match=r"(?s)stage 'ingest' failed.*timed out after 0.5s"):
        pipeline(root=str(repo))
    assert not (repo / "data" / "ingested").exists()  # no half-written output
    # Nothing of the killed stage lingers: DVC's lock is free and the stage runs by hand.
    assert "Running stage 'ingest'" in run(["dvc", "repro", "ingest"], repo).stdout


def test_a_second_run_in_the_same_workspace_is_refused(dvc_project: Path) -> None:
    repo = dvc_project
    busy = r"another graft run holds .*run\.lock \(pid"
    with workspace_lock(repo, wait_s=0), pytest.raises(WorkspaceBusy, match=busy):
        pipeline(root=str(repo), wait_for_workspace_s=1)
    assert not (repo / "data").exists()  # refused before any stage ran


def _task_run_states(flow_run_id: UUID) -> dict[str, list[str | None]]:
    """Each task run of the flow run (by task run name) and the names of its states, in order."""
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        return {t.name: [s.name for s in client.read_task_run_states(t.id)] for t in task_runs}


def test_a_stage_is_retried_while_another_dvc_command_holds_the_lock(
    dvc_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []
    real_repro = stages.repro

    def locked_once(root: Path, stage: str, force: bool, timeout_s: float) -> tuple[int, list[str]]:
        attempts.append(stage)
        if attempts == [SCAN_STAGE, "ingest"]:  # what dvc prints when another dvc command holds
            return 1, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"]
        return real_repro(root, stage, force, timeout_s)

    monkeypatch.setattr(stages, "repro", locked_once)
    state = pipeline(root=str(dvc_project), stages=["split"], return_state=True)
    returned = state.result()
    assert attempts == [SCAN_STAGE, "ingest", "ingest", "split"]  # a retry runs `dvc repro` again
    assert ran(returned) == [SCAN_STAGE, "ingest", "split"]
    (ingest,) = [r for r in results(returned) if r.stage == "ingest"]
    assert ingest.seconds >= 1  # the wait before the first retry counts
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    retried = [names for name, names in _task_run_states(flow_run_id).items() if "ingest" in name]
    assert len(retried) == 1 and {"AwaitingRetry", "Retrying"} <= set(retried[0])  # in the UI


def test_other_failures_are_not_retried_and_lock_retries_run_out(
    dvc_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_param(dvc_project, "lock_retries: 5", "lock_retries: 1")
    attempts: list[str] = []

    def failing(root: Path, stage: str, force: bool, timeout_s: float) -> tuple[int, list[str]]:
        attempts.append(stage)
        return 1, ["the stage itself exploded"]

    monkeypatch.setattr(stages, "repro", failing)
    with pytest.raises(StageFailed, match="the stage itself exploded") as failure:
        pipeline(root=str(dvc_project))
    assert not isinstance(failure.value, DvcLocked) and attempts == [SCAN_STAGE]  # the first

    attempts.clear()

    def always_locked(
        root: Path, stage: str, force: bool, timeout_s: float
    ) -> tuple[int, list[str]]:
        attempts.append(stage)
        return 1, ["ERROR: Unable to acquire lock"]

    monkeypatch.setattr(stages, "repro", always_locked)
    locked = rf"stage '{SCAN_STAGE}' failed: Unable to acquire lock \(`dvc repro` exited with 1\)"
    with pytest.raises(DvcLocked, match=locked):
        pipeline(root=str(dvc_project))
    assert attempts == [SCAN_STAGE, SCAN_STAGE]  # the first attempt and its one retry
