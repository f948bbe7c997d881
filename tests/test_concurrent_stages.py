"""Independent stages side by side in one workspace: work trees, the run-cache, dvc.lock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import pipeline_is_current, run
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline
from flows.stages import StageFailed, StageResult

pytestmark = pytest.mark.slow
SIDE_BY_SIDE = ("pretrain", "baseline")  # both wait for split only


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield


def where(results: object) -> dict[str, str]:
    assert isinstance(results, list)
    return {r.stage: r.where for r in results if isinstance(r, StageResult) and r.ran}


def task_spans(flow_run_id: object) -> dict[str, tuple[float, float]]:
    """Each task run of the flow run: (start, end), as Prefect recorded them."""
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))  # type: ignore[list-item]
        )
    return {
        t.name: (t.start_time.timestamp(), t.end_time.timestamp())
        for t in task_runs
        if t.start_time and t.end_time
    }


def side_by_side(project: Path, max_parallel: int = 2) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["run"]["max_parallel"] = max_parallel
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", f"max_parallel {max_parallel}"], project)


def test_independent_stages_overlap_and_dvc_lock_is_a_plain_repro(
    dvc_project: Path, tmp_path: Path
) -> None:
    side_by_side(dvc_project)
    state = pipeline(root=str(dvc_project), return_state=True)
    results = state.result()
    placed = where(results)
    assert {placed[s] for s in SIDE_BY_SIDE} == {"worktree"}
    assert placed["split"] == placed["evaluate"] == "workspace"  # alone: in the workspace
    spans = task_spans(state.state_details.flow_run_id)
    (pretrain,) = [v for k, v in spans.items() if k.startswith("pretrain (worktree)")]
    (baseline,) = [v for k, v in spans.items() if k.startswith("baseline (worktree)")]
    assert max(pretrain[0], baseline[0]) < min(pretrain[1], baseline[1])  # at the same time
    assert pipeline_is_current(dvc_project)
    for stage in SIDE_BY_SIDE:  # ran in its work tree, sharing the workspace's cache
        assert (dvc_project / ".graft" / "worktrees" / stage / "dvc.lock").exists()

    plain = tmp_path / "plain"
    run(["git", "clone", "-q", str(dvc_project), str(plain)], tmp_path)
    run(["dvc", "repro"], plain)
    expected = yaml.safe_load((plain / "dvc.lock").read_text())["stages"]
    assert yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"] == expected
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], dvc_project).stdout in (
        "",
        " M dvc.lock\n",
        "?? dvc.lock\n",
    )  # the work trees changed nothing git tracks


def test_by_default_every_stage_runs_in_the_workspace_one_at_a_time(dvc_project: Path) -> None:
    results = pipeline(root=str(dvc_project), stages=list(SIDE_BY_SIDE))
    assert set(where(results)) >= set(SIDE_BY_SIDE)
    assert set(where(results).values()) == {"workspace"}
    assert not (dvc_project / ".graft" / "worktrees").exists()


def test_a_failing_stage_waits_for_its_sibling_and_nothing_downstream_runs(
    dvc_project: Path,
) -> None:
    side_by_side(dvc_project)
    code = dvc_project / "tasks" / "baseline.py"  # an uncommitted edit: work trees run it too
    code.write_text(code.read_text() + "\nraise SystemExit('baseline exploded')\n")
    with pytest.raises(StageFailed, match=r"(?s)stage 'baseline' failed.*baseline exploded"):
        pipeline(root=str(dvc_project))
    assert (dvc_project / "models" / "pretrained.pt").exists()  # the sibling was awaited
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
    assert "pretrain" in lock and "baseline" not in lock
    assert not (dvc_project / "models" / "finetuned.pt").exists()  # downstream never started
