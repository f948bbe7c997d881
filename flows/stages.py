"""DVC's stages as Prefect tasks: DVC's order, DVC's verdict, and ``dvc repro`` of a stale one.

dvc.yaml stays the only declaration of the pipeline: the order comes from DVC's stage graph,
DVC says whether a stage is up to date, and a stale stage runs through ``dvc repro`` (so
``dvc.lock`` is updated exactly as by hand) with its output streamed into the Prefect log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import networkx as nx
from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from flows.artifacts import StageRow
from graft.processes import dvc_command, env_with_this_python

DVC_LOCKED = "Unable to acquire lock"  # what dvc prints when another dvc command holds the repo
TAIL_LINES = 20  # of a stage's output, kept for the error when it fails


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited with an error or ran past its timeout."""


class DvcLocked(StageFailed):
    """``dvc repro`` of one stage stopped because another DVC command held the repository lock.

    The only failure the stage task retries (see :func:`retry_if_dvc_locked`).
    """


@dataclass(frozen=True)
class StageResult:
    """What one stage task did: ``stage`` (its name), ``ran`` (False: DVC reported it up to
    date and nothing was run) and ``seconds`` (the task's wall time, retries included)."""

    stage: str
    ran: bool
    seconds: float

    def row(self) -> StageRow:
        """This result as a row of the run's stage table: status "ran" or "cached"."""
        return StageRow(self.stage, "ran" if self.ran else "cached", self.seconds)


def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """The stage names of the DVC project ``root``, every stage after all of its dependencies.

    With ``targets`` (stage names), only those stages and everything upstream of them. Stages
    whose dependencies are all done go in dvc.yaml's order: for this pipeline, the order `dvc
    repro` runs them in. Raises ValueError naming any target that is not a stage of dvc.yaml.
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
        declared = {stage.name: position for position, stage in enumerate(repo.index.stages)}
        # Reversed, an edge runs from a dependency to its dependant: a topological order of it
        # puts dependencies first; the key breaks ties the same way on every run.
        upstream_first = nx.lexicographical_topological_sort(
            graph.reverse(copy=False), key=lambda stage: declared[stage.name]
        )
        return [stage.name for stage in upstream_first]


def is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's own verdict on ``stage`` of the project ``root``: True when none of its deps,
    outs, params or command changed. Raises DVC's LockError when another DVC command holds
    the repository, and ValueError when dvc.yaml has no such stage."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        (found,) = (s for s in repo.index.stages if s.name == stage)
        return not found.status()


def _repro(root: Path, stage: str, force: bool, timeout_s: float) -> tuple[int, list[str]]:
    """Run `dvc repro` for one stage, streaming its output; kill its process tree on timeout.

    Returns the exit code and the last output lines.
    """
    logger = get_run_logger()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("%s: running `%s`", stage, " ".join(["dvc", *args]))
    # A session of its own, so a timeout can kill dvc and the stage command it started. The
    # stage commands call `python`: this environment's, as `dvc repro` by hand would use.
    process = subprocess.Popen(
        dvc_command(*args), cwd=root, env=env_with_this_python(), stdout=subprocess.PIPE,
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
            tail = [*tail[-(TAIL_LINES - 1) :], line.rstrip()]
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


def retry_if_dvc_locked(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """The stage task's retry condition, in Prefect's form for ``retry_condition_fn``.

    Takes the task, its run and the Failed state of the attempt that just ended. Returns True
    when that attempt raised DvcLocked (another DVC command held the repository lock), False
    for any other failure: a stage that failed on its own fails the same way again. Raises
    what reading the state raises; Prefect then does not retry.
    """
    return isinstance(state.result(raise_on_failure=False), DvcLocked)


@task(name="stage", retry_condition_fn=retry_if_dvc_locked)
def run_stage(root: Path, stage: str, *, force: bool, timeout_s: float) -> StageResult:
    """Run ``stage`` of the project ``root`` unless DVC reports it up to date (or ``force``).

    Streams the stage's output into the Prefect log and kills it, with its whole process
    tree, after ``timeout_s`` seconds. Returns what was done. Raises DvcLocked when `dvc
    repro` found the repository locked by another DVC command (the one failure retried, see
    :func:`stage_task`), StageFailed when the stage failed or timed out, and DVC's LockError
    when the repository is locked while DVC is asked whether the stage is up to date.
    """
    logger = get_run_logger()
    context = TaskRunContext.get()
    assert context is not None  # a task's body always runs in its task run's context
    # Prefect sets the start before the first attempt's body runs; it stays across retries.
    started = context.task_run.start_time or datetime.now(UTC)
    # A retry follows a `dvc repro` that found DVC's lock held: asking DVC again whether the
    # stage is up to date would need that same lock, so a retry goes straight to `dvc repro`.
    if context.task_run.run_count <= 1 and not force and is_up_to_date(root, stage):
        logger.info("%s: up to date (DVC cache)", stage)
        return StageResult(stage, ran=False, seconds=_seconds_since(started))
    code, tail = _repro(root, stage, force, timeout_s)
    if code == 0:
        return StageResult(stage, ran=True, seconds=_seconds_since(started))
    last_lines = "\n".join(tail)
    message = f"stage {stage!r} failed (exit {code}):\n{last_lines}"
    if any(DVC_LOCKED in line for line in tail):
        logger.warning("%s: another DVC command holds the repository lock", stage)
        raise DvcLocked(message)
    raise StageFailed(message)


def stage_task(stage: str, lock_retries: int) -> Task[..., StageResult]:
    """:func:`run_stage` as the task for ``stage``: named after it, and retried up to
    ``lock_retries`` times while DVC's lock is held, 1, 2, 4, ... seconds apart (no other
    failure is retried; past 50 retries each waits as long as the 50th). Returns the task,
    ready to call. Raises nothing for ``lock_retries`` >= 0, as params.yaml's are."""
    return run_stage.with_options(
        name=stage,
        retries=lock_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
    )


def _seconds_since(started: datetime) -> float:
    return (datetime.now(UTC) - started).total_seconds()
