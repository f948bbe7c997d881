"""Stages side by side: each stage starts as soon as the stages it depends on are done.

A stage whose upstream is done starts at once, wherever it runs:

* on a worker of the work pool ``run.placement`` names for it (flows/placement.py);
* in the orchestrating workspace itself, when it is the only stage running (as `dvc repro`
  would run it, and as every stage ran before stages ran side by side);
* else in a work tree of its own (flows/worktrees.py), at most ``run.max_parallel`` local
  stages at a time, its result taken over through DVC's run-cache in the shared cache.

The orchestrating workspace's DVC (dvc.lock, the up-to-date checks, the hand-overs) is used
by one step at a time (:func:`workspace_dvc`), so dvc.lock is never written by two commands
at once and never records a stage twice. When a stage fails, nothing downstream of it starts;
the stages already running beside it are awaited (their results are cached by DVC for the
next run) and the run then fails with the first failure. An interrupted run stops every
stage it runs, local or placed, before it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger

from flows.dvc_commands import checkout
from flows.failures import stage_failure
from flows.placement import (
    await_placed,
    cancel_placed_runs,
    dispatch,
    orchestrator_commit,
    take_over,
)
from flows.stages import (
    STOPPED_NOTE,
    StageFailed,
    StageGraph,
    StageOutcome,
    StageResult,
    _seconds_since,
    _up_to_date_unless_locked,
    cached,
    is_up_to_date,
    repro,
    stage_task,
    stop_running_stages,
    task_result,
)
from flows.worktrees import (
    WorktreeError,
    snapshot_commit,
    stage_worktree,
    untracked_files,
    write_lock_file,
)
from graft.config.params import Run

_workspace_locks: dict[Path, threading.RLock] = {}
_workspace_locks_guard = threading.Lock()


@contextmanager
def workspace_dvc(project: Path) -> Iterator[None]:
    """Hold the DVC of the orchestrating workspace ``project`` for one step (an up-to-date
    check, reading dvc.lock, a push, a hand-over): stage tasks of one run, in threads, take
    turns. Raises nothing itself."""
    with _workspace_locks_guard:
        lock = _workspace_locks.setdefault(project.resolve(), threading.RLock())
    with lock:
        yield


def read_lock_file(project: Path) -> str:
    """The text of ``project``'s dvc.lock, or "" when no stage has been recorded yet."""
    path = project / "dvc.lock"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def run_stage_graph(
    project: Path,
    graph: StageGraph,
    settings: Run,
    force: bool,
    outcomes: dict[str, StageResult | Exception] | None = None,
) -> list[StageResult]:
    """Run the stages of ``graph`` in the project ``project``, each as soon as its upstream
    is done (see the module's docstring); ``settings`` are params.yaml's ``run`` section,
    ``force`` runs stages DVC reports up to date too.

    ``outcomes``, when given, is filled in as stages end: each one's result, or the exception
    it failed with, for a caller that reports a failed run. Returns one result per stage that
    ran or was found up to date, in ``graph.order``. Raises the first stage failure
    (StageFailed, DvcLocked) once the stages running beside it have ended, and what
    interrupted the run after stopping every stage it runs."""
    results: dict[str, StageResult] = {}
    ended: dict[str, StageResult | Exception] = {} if outcomes is None else outcomes
    running: dict[PrefectFuture[StageOutcome], tuple[str, bool]] = {}  # -> (stage, local)
    failures: list[BaseException] = []
    beside = _Beside(project, graph)
    try:
        while True:
            started = {stage for stage, _ in running.values()}
            ready = [
                s
                for s in graph.order
                if s not in results and s not in started and graph.upstream[s] <= set(results)
            ]
            if failures:
                ready = []  # nothing new starts once a stage has failed
            placed = [s for s in ready if s in settings.placement]
            local = [s for s in ready if s not in settings.placement]
            alone = not running and not placed and bool(local)
            first_current = False
            if alone and len(local) > 1 and not force:
                # A stage DVC reports up to date completes at once: it need not make the
                # others run beside it, in work trees. Those go first, one at a time.
                current = {stage: _current(project, stage) for stage in local}
                local.sort(key=lambda stage: not current[stage])
                first_current = current[local[0]]
            if alone and (
                len(local) == 1
                or settings.max_parallel == 1
                or first_current
                or not beside.can_run(local[0])
            ):  # in the workspace itself, as `dvc repro` would run it
                stage = local[0]
                run_one = stage_task(stage, settings.lock_retries)
                timeout_s = settings.timeout_for(stage)
                try:
                    outcome = run_one(project, stage, force=force, timeout_s=timeout_s)
                    results[stage] = ended[stage] = task_result(outcome)
                except Exception as error:  # nothing else runs: the loop ends and raises it
                    failures.append(error)
                    ended[stage] = error
                continue
            for stage in placed:
                running[_submit_placed(project, graph, settings, stage, force)] = (stage, False)
            slots = settings.max_parallel - sum(is_local for _, is_local in running.values())
            for stage in local:  # the others wait for a slot, or for the workspace
                if slots > 0 and beside.can_run(stage):
                    future = _submit_local(project, graph, settings, stage, force, beside.commit)
                    running[future] = (stage, True)
                    slots -= 1
            if not running:
                break
            done = next(as_completed(list(running)))
            stage, _ = running.pop(done)
            try:
                results[stage] = ended[stage] = task_result(done.result())
            except Exception as error:
                failures.append(error)
                ended[stage] = error
    except BaseException as error:  # interrupted: stop what runs, in threads or on workers
        stopped = stop_running_stages()
        cancelled = cancel_placed_runs()
        for future in running:
            future.wait(timeout=30)
        if stopped or running:
            names = sorted(set(stopped) | {stage for stage, _ in running.values()})
            error.add_note(STOPPED_NOTE.format(stage=", ".join(names)))
        if cancelled:
            get_run_logger().warning("cancelled the placed runs %s", cancelled)
        raise
    if failures:
        raise failures[0]
    return [results[s] for s in graph.order if s in results]


def _current(project: Path, stage: str) -> bool:
    """DVC's verdict on ``stage``, asked before choosing where it runs; a busy DVC counts as
    stale (the stage's task then waits for DVC's lock, with its retries)."""
    from dvc.lock import LockError

    try:
        return is_up_to_date(project, stage)
    except LockError:
        return False


class _Beside:
    """Whether a stage can run beside others, in a work tree: the working tree's snapshot
    commit can be made (a git repository with a first commit) and none of the stage's files
    is untracked (a snapshot holds tracked files only). Asked once per stage, lazily."""

    def __init__(self, project: Path, graph: StageGraph) -> None:
        self.project, self.graph = project, graph
        self.commit = ""
        self._snapshot_error: str | None = None
        self._answers: dict[str, bool] = {}

    def can_run(self, stage: str) -> bool:
        if stage not in self._answers:
            self._answers[stage] = self._ask(stage)
        return self._answers[stage]

    def _ask(self, stage: str) -> bool:
        logger = get_run_logger()
        if not self.commit and self._snapshot_error is None:
            try:
                self.commit = snapshot_commit(self.project)
            except WorktreeError as error:
                self._snapshot_error = str(error)
                logger.warning("stages run one at a time: no git snapshot (%s)", error)
        if self._snapshot_error is not None:
            return False
        untracked = untracked_files(self.project, self.graph.inputs[stage].files)
        if untracked:
            logger.warning(
                "%s: runs in the workspace, not beside other stages: files it depends on are "
                "not tracked by git: %s",
                stage,
                ", ".join(untracked),
            )
        return not untracked


def _submit_placed(
    project: Path, graph: StageGraph, settings: Run, stage: str, force: bool
) -> PrefectFuture[StageOutcome]:
    pool = settings.placement[stage]
    placed = stage_task(stage, settings.lock_retries, run_placed_unless_current, f"{stage}@{pool}")
    return placed.submit(
        project,
        stage,
        pool,
        graph.inputs[stage].data,
        force=force,
        timeout_s=settings.timeout_for(stage),
        lock_retries=settings.lock_retries,
    )


def _submit_local(
    project: Path, graph: StageGraph, settings: Run, stage: str, force: bool, commit: str
) -> PrefectFuture[StageOutcome]:
    beside = stage_task(stage, settings.lock_retries, run_in_worktree, f"{stage} (worktree)")
    return beside.submit(
        project,
        stage,
        graph.inputs[stage].data,
        commit=commit,
        force=force,
        timeout_s=settings.timeout_for(stage),
    )


def _started() -> datetime:
    context = TaskRunContext.get()
    return (context.task_run.start_time if context else None) or datetime.now(UTC)


@task(name="placed")
def run_placed_unless_current(
    project: Path,
    stage: str,
    pool: str,
    data: list[str],
    *,
    force: bool,
    timeout_s: float,
    lock_retries: int,
) -> StageOutcome:
    """``stage`` on a worker of ``pool`` (flows/placement.py), unless DVC reports it up to
    date in ``project`` (and not ``force``). Returns what was done. Raises DvcLocked while
    another DVC command holds the workspace, StageFailed when the placed run fails."""
    started = _started()
    with workspace_dvc(project):
        if not force and _up_to_date_unless_locked(project, stage):
            get_run_logger().info("%s: up to date (DVC cache)", stage)
            return cached(StageResult(stage, ran=False, seconds=_seconds_since(started)))
        parameters = {
            "stage": stage, "commit": orchestrator_commit(project),
            "dvc_lock": read_lock_file(project), "force": force, "timeout_s": timeout_s,
            "lock_retries": lock_retries,
        }  # fmt: skip
        clock = time.monotonic()
        flow_run_id = dispatch(project, stage, pool, data, parameters)
        dispatch_s = time.monotonic() - clock
    await_placed(flow_run_id, stage, pool, timeout_s - _seconds_since(started))
    with workspace_dvc(project):
        clock = time.monotonic()
        take_over(project, stage, pool, timeout_s)
        take_over_s = time.monotonic() - clock
    # One line a benchmark or a person can read: the hand-over's cost on this side.
    get_run_logger().info(
        "%s: hand-over here: pushed deps and dispatched in %.2fs, took over in %.2fs",
        stage, dispatch_s, take_over_s,
    )  # fmt: skip
    return StageResult(stage, ran=True, seconds=_seconds_since(started), where=f"pool {pool}")


@task(name="worktree")
def run_in_worktree(
    project: Path, stage: str, data: list[str], *, commit: str, force: bool, timeout_s: float
) -> StageOutcome:
    """``stage`` in its work tree of ``project`` at ``commit`` (flows/worktrees.py), beside
    other stages, unless DVC reports it up to date (and not ``force``); its result is then
    taken over into ``project`` through the run-cache. ``data``: its data dependencies,
    checked out of the shared cache. Returns what was done. Raises DvcLocked while another
    DVC command holds the workspace, StageFailed when the stage or the take-over fails."""
    logger = get_run_logger()
    started = _started()
    with workspace_dvc(project):
        if not force and _up_to_date_unless_locked(project, stage):
            logger.info("%s: up to date (DVC cache)", stage)
            return cached(StageResult(stage, ran=False, seconds=_seconds_since(started)))
        dvc_lock = read_lock_file(project)
    worktree = stage_worktree(project, stage, commit)
    logger.info("%s: running beside other stages in %s", stage, worktree)
    write_lock_file(worktree, dvc_lock)
    if data:
        checkout(worktree, data)
    code, tail = repro(worktree, stage, force, timeout_s)
    if code != 0:
        raise StageFailed(stage_failure(stage, code, tail, what="failed in its work tree"))
    with workspace_dvc(project):
        code, tail = repro(project, stage, force=False, timeout_s=timeout_s)
    if code != 0:
        what = f"ran in {worktree}, but its result could not be taken over"
        raise StageFailed(stage_failure(stage, code, tail, what))
    return StageResult(stage, ran=True, seconds=_seconds_since(started), where="worktree")
