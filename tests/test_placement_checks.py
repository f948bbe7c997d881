"""run.placement and run.max_parallel are checked before any work; work-tree helpers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, run

from flows.dvc_commands import DvcDataError, cache_dir, checkout, pull, push
from flows.placement import PlacementError, check_placement, ran_again
from flows.stages import DvcLocked, stage_graph, stage_order
from flows.worktrees import snapshot_commit, stage_worktree, uncommitted, untracked_files
from graft.config.params import ParamsError, parse_params


@pytest.fixture
def raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
    return loaded


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (
            {"pretrain": ""},
            "run.placement.pretrain: Value error, a work pool's name cannot be empty",
        ),
        ({"pretrain": "  "}, "run.placement.pretrain: Value error, a work pool's name cannot be"),
        ({"pretrain": "a/b"}, "run.placement.pretrain: Value error, 'a/b' is not a work pool name"),
        ({"pretrain": 3}, "run.placement.pretrain: Input should be a valid string"),
    ],
)
def test_a_bad_pool_name_is_named(raw: dict[str, Any], placement: Any, message: str) -> None:
    raw["run"]["placement"] = placement
    with pytest.raises(ParamsError, match=re.escape("run.placement.pretrain: ")) as bad:
        parse_params(raw)
    assert message in str(bad.value)


def test_max_parallel_is_at_least_one(raw: dict[str, Any]) -> None:
    assert parse_params(raw).run.max_parallel == 1
    raw["run"]["max_parallel"] = 0
    with pytest.raises(ParamsError, match=r"run\.max_parallel: Input should be greater than"):
        parse_params(raw)


def test_placement_is_refused_before_any_work(dvc_project: Path) -> None:
    every_stage = stage_order(dvc_project)
    graph = stage_graph(dvc_project)

    def refused(placement: dict[str, str]) -> str:
        with pytest.raises(PlacementError) as refusal:
            check_placement(dvc_project, placement, every_stage, graph)
        return str(refusal.value)

    assert refused({"trian": "gpu"}) == "run.placement names stages not in dvc.yaml: trian"
    assert refused({"scan": "gpu"}).startswith("run.placement.scan: an always_changed stage")
    assert "none is configured: `dvc remote add -d" in refused({"pretrain": "gpu"})
    run(["dvc", "remote", "add", "-d", "store", "s3://bucket/path"], dvc_project)
    run(["git", "commit", "-qam", "a remote"], dvc_project)
    code = dvc_project / "tasks" / "pretrain.py"
    code.write_text(code.read_text() + "\n# not committed\n")
    (dvc_project / "graft" / "new_module.py").write_text("")  # untracked, not a dep: ignored
    assert refused({"pretrain": "gpu"}) == (
        "run.placement.pretrain: uncommitted changes to files it depends on: tasks/pretrain.py; "
        "the worker runs the committed code: commit and push them first"
    )
    # Stages outside this run are only checked by name.
    check_placement(
        dvc_project, {"pretrain": "gpu"}, every_stage, stage_graph(dvc_project, ["split"])
    )


def test_work_tree_helpers_on_a_real_repository(dvc_project: Path) -> None:
    head = run(["git", "rev-parse", "HEAD"], dvc_project).stdout.strip()
    assert snapshot_commit(dvc_project) == head  # nothing changed: HEAD itself
    code = dvc_project / "tasks" / "split.py"
    code.write_text(code.read_text() + "\n# edited\n")
    (dvc_project / "tasks" / "extra.py").write_text("")
    paths = ["tasks/split.py", "tasks/extra.py", "tasks/ingest.py"]
    assert uncommitted(dvc_project, paths) == ["tasks/extra.py", "tasks/split.py"]
    assert untracked_files(dvc_project, paths) == ["tasks/extra.py"]
    snapshot = snapshot_commit(dvc_project)
    assert snapshot != head
    assert run(["git", "stash", "list"], dvc_project).stdout == ""  # the stash is left alone
    assert code.read_text().endswith("# edited\n")  # and the working tree too

    tree = stage_worktree(dvc_project, "split", snapshot)
    assert tree == dvc_project / ".graft" / "worktrees" / "split"
    assert (tree / "tasks" / "split.py").read_text() == code.read_text()
    assert not (tree / "tasks" / "extra.py").exists()
    cache = run(["dvc", "cache", "dir"], tree).stdout.strip()
    assert Path(cache) == (dvc_project / ".dvc" / "cache").resolve()
    assert (tree / ".graft" / "decoded").resolve() == (dvc_project / ".graft" / "decoded").resolve()
    again = stage_worktree(dvc_project, "split", head)  # moved, not made again
    assert again == tree and (tree / "tasks" / "split.py").read_text() != code.read_text()
    assert run(["git", "status", "--porcelain"], dvc_project).stdout.split("\n")[0] == (
        " M tasks/split.py"
    )


def test_no_flow_module_shadows_an_installed_one() -> None:
    # A worker loads a deployment's entrypoint (flows/placement.py, flows/pipeline.py) with
    # flows/ first on sys.path: a module there named like an installed one (dvc_data is
    # DVC's) would be imported in its place, and the placed run would fail on import.
    import importlib.util

    for module in sorted((ROOT / "flows").glob("*.py")):
        if module.stem == "__init__":
            continue
        found = importlib.util.find_spec(module.stem)
        assert found is None, f"flows/{module.name} shadows the installed {found.origin}"


def test_dvc_commands_in_process_move_data_and_name_what_failed(
    dvc_project: Path, tmp_path: Path
) -> None:
    data = dvc_project / "notes" / "notes.txt"
    data.parent.mkdir(exist_ok=True)
    data.write_text("hand me over\n")
    run(["dvc", "add", "notes/notes.txt"], dvc_project)
    with pytest.raises(DvcDataError, match=r"`dvc push notes/notes.txt` in .* failed: .*remote"):
        push(dvc_project, ["notes/notes.txt"])  # no default remote yet

    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "folder", str(remote)], dvc_project)
    push(dvc_project, ["notes/notes.txt"])
    assert any(p.is_file() for p in remote.rglob("*"))
    cache = cache_dir(dvc_project)
    shutil.rmtree(cache)
    data.unlink()
    pull(dvc_project, ["notes/notes.txt"])  # back from the remote, into cache and workspace
    assert data.read_text() == "hand me over\n"
    data.unlink()
    checkout(dvc_project, ["notes/notes.txt"])  # from the cache alone
    assert data.read_text() == "hand me over\n"

    shutil.rmtree(remote)
    shutil.rmtree(cache)
    data.unlink()
    with pytest.raises(DvcDataError, match=r"`dvc pull notes/notes.txt` in .* failed"):
        pull(dvc_project, ["notes/notes.txt"])

    holder = subprocess.Popen(  # another process holds the repository's lock
        [sys.executable, "-c", HOLD_DVC_LOCK, str(dvc_project)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DvcLocked, match=r"`dvc checkout notes/notes.txt`"):
            checkout(dvc_project, ["notes/notes.txt"])
    finally:
        holder.kill()
        holder.wait()


HOLD_DVC_LOCK = """
import sys, time
from dvc.repo import Repo
repo = Repo(sys.argv[1])
repo.lock.lock()
print("held", flush=True)
time.sleep(60)
"""


def test_a_take_over_that_found_nothing_to_do_is_no_rerun() -> None:
    cached = ["Stage 'pretrain' is cached - skipping run, checking out outputs", "Updating lock"]
    current = ["Stage 'pretrain' didn't change, skipping", "Data and pipelines are up to date."]
    fresh_clone = ["Data and pipelines are up to date."]  # dvc.lock already records it
    assert not any(ran_again(tail) for tail in (cached, current, fresh_clone))
    assert ran_again(["epoch 12: loss 0.1", "Updating lock file 'dvc.lock'"])
