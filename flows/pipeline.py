"""The Prefect flow: one task per DVC stage, in DVC's order, with DVC deciding what runs.

dvc.yaml stays the only declaration of the pipeline. The flow reads the stage graph from DVC,
asks DVC whether each stage is up to date, and runs a stale one through ``dvc repro`` (so
``dvc.lock`` is updated exactly as by hand). A stage DVC reports up to date is a task that
completes at once and says so. A failed stage fails its task and the flow; nothing downstream
of it runs.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import networkx as nx
from prefect import flow, task
from prefect.logging import get_run_logger

from flows.artifacts import StageRow, publish_run_artifacts
from graft.config.params import load_params
from graft.processes import env_with_this_python


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited with an error or ran past its timeout."""


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    ran: bool  # False: DVC reported it up to date, nothing was run
    seconds: float

    def row(self) -> StageRow:
        return StageRow(self.stage, "ran" if self.ran else "cached", self.seconds)


def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """Stage names in the order DVC would evaluate them: every stage after its dependencies.

    With ``targets``, only those stages and everything upstream of them.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {stage.name: stage for stage in graph}
        unknown = sorted(set(targets or []) - set(by_name))
        if unknown:
            raise ValueError(f"no such stage in dvc.yaml: {', '.join(unknown)}")
        if targets:
            keep = set().union(*(nx.descendants(graph, by_name[t]) | {by_name[t]} for t in targets))
            graph = graph.subgraph(keep)
        # Post-order visits a stage's dependencies before the stage itself.
        tops = sorted((s for s in graph if graph.in_degree(s) == 0), key=lambda s: s.name)
        order: list[str] = []
        for top in tops:
            for stage in nx.dfs_postorder_nodes(graph, top):
                if stage.name not in order:
                    order.append(stage.name)
        return order


def is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's own verdict: no changed deps, outs, params or command for this stage."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        (found,) = (s for s in repo.index.stages if s.name == stage)
        return not found.status()


DVC_LOCKED = "Unable to acquire lock"  # what dvc prints when another dvc command holds the repo


def _repro(root: Path, stage: str, force: bool, timeout_s: float) -> tuple[int, list[str]]:
    """Run `dvc repro` for one stage, streaming its output; kill its process tree on timeout.

    Returns the exit code and the last output lines.
    """
    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("%s: running `%s`", stage, " ".join(command))
    # A session of its own, so a timeout can kill dvc and the stage command it started. The
    # stage commands call `python`: this environment's, as `dvc repro` by hand would use.
    process = subprocess.Popen(
        command, cwd=root, env=env_with_this_python(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    killed = threading.Event()
    timer = threading.Timer(timeout_s, _kill_tree, args=(process, killed))
    timer.start()
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            logger.info("%s | %s", stage, line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
        code = process.wait()
    finally:
        timer.cancel()
    if killed.is_set():
        tail.append(f"timed out after {timeout_s:g}s: killed with its whole process tree")
    return code, tail


def _kill_tree(process: subprocess.Popen[str], killed: threading.Event) -> None:
    killed.set()
    with suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


@task(name="stage")
def run_stage(
    root: Path, stage: str, *, force: bool, timeout_s: float, lock_retries: int
) -> StageResult:
    """Run one DVC stage unless DVC reports it up to date; stream its output into the log."""
    logger = get_run_logger()
    started = time.perf_counter()
    if not force and is_up_to_date(root, stage):
        logger.info("%s: up to date (DVC cache)", stage)
        return StageResult(stage, ran=False, seconds=time.perf_counter() - started)
    for attempt in range(lock_retries + 1):
        code, tail = _repro(root, stage, force, timeout_s)
        if code == 0:
            return StageResult(stage, ran=True, seconds=time.perf_counter() - started)
        if not any(DVC_LOCKED in line for line in tail) or attempt == lock_retries:
            break
        wait = 2**attempt
        logger.warning(
            "%s: another DVC command holds the repository lock; retry in %ss", stage, wait
        )
        time.sleep(wait)
    last_lines = "\n".join(tail)
    raise StageFailed(f"stage {stage!r} failed (exit {code}):\n{last_lines}")


@contextmanager
def workspace_lock(root: Path, wait_s: float) -> Iterator[None]:
    """Hold the workspace for one run: never two pipeline runs (and dvc.lock writers) at once."""
    path = root / ".graft" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise WorkspaceBusy(
                        f"another graft run holds {path} ({holder}); waited {wait_s:g}s"
                    ) from None
                time.sleep(1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield  # the lock is released when the file closes, even if the process dies


def _dvc(root: Path, *arguments: str) -> str:
    env = env_with_this_python()
    result = subprocess.run(
        ["dvc", *arguments], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout


def _sync_with_remote(root: Path, *command: str) -> None:
    """`dvc pull` or `dvc push` when a DVC remote is configured; say so when none is."""
    logger = get_run_logger()
    if not _dvc(root, "remote", "list").strip():
        logger.info("%s: no DVC remote configured; nothing to %s", command[0], command[0])
        return
    logger.info("dvc %s: %s", command[0], _dvc(root, *command).strip())


@task(name="publish")
def _publish(root: Path, bump: Literal["patch", "minor", "major"], stage: str | None) -> None:
    """`graft publish` as a task: a new model version, or a clear note that nothing is new."""
    from graft.registry.publish import AlreadyPublished, PublishError, publish

    logger = get_run_logger()
    try:
        published = publish(root, bump=bump, stage=stage)
    except AlreadyPublished as note:  # a scheduled run with nothing new: not a failure
        logger.info("publish: nothing new to publish: %s", note)
        return
    except PublishError as error:
        raise StageFailed(f"publish refused: {error}") from None
    stage_note = f", stage tag {published.stage_tag}" if published.stage_tag else ""
    pushed = "data pushed to the DVC remote" if published.pushed else "no DVC remote to push to"
    logger.info(
        "publish: %s at commit %s%s; %s", published.tag, published.commit[:12], stage_note, pushed
    )


@flow(name="graft-pipeline", log_prints=True)
def pipeline(
    root: str = ".",
    stages: list[str] | None = None,
    force: bool = False,
    pull: bool = False,
    push: bool = False,
    publish: bool = False,
    publish_bump: Literal["patch", "minor", "major"] = "patch",
    publish_stage: str | None = None,
    wait_for_workspace_s: float = 0.0,
) -> list[StageResult]:
    """Run the DVC pipeline in ``root``, a task per stage; ``stages`` limits it (with upstream).

    ``pull``/``push`` sync data with the DVC remote when one is configured. ``publish`` then
    registers the model as the next version (``publish_bump``), optionally assigning it
    ``publish_stage``, exactly as `graft publish` does.
    """
    project = Path(root).resolve()
    params = load_params(project / "params.yaml")  # bad params fail before any stage runs
    settings = params.run
    every_stage = stage_order(project)
    order = stage_order(project, stages) if stages else every_stage
    unknown = sorted(set(settings.timeout_s) - set(every_stage) - {"default"})
    if unknown:
        raise ValueError(f"run.timeout_s names stages not in dvc.yaml: {', '.join(unknown)}")
    with workspace_lock(project, wait_for_workspace_s):
        if pull:
            _sync_with_remote(project, "pull", "--allow-missing")
        results = []
        for stage in order:  # in order; a failure raises, so nothing downstream runs
            run_one = run_stage.with_options(name=stage)
            timeout_s, retries = settings.timeout_for(stage), settings.lock_retries
            results.append(
                run_one(project, stage, force=force, timeout_s=timeout_s, lock_retries=retries)
            )
        if push:
            _sync_with_remote(project, "push")
        publish_run_artifacts(project, params, [r.row() for r in results])
        if publish:  # still holding the workspace: it commits dvc.lock and tags the commit
            _publish(project, bump=publish_bump, stage=publish_stage)
    return results
