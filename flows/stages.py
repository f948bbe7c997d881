"""DVC's stages as Prefect tasks: DVC's order, DVC's verdict, and ``dvc repro`` of a stale one.

dvc.yaml stays the only declaration of the pipeline: the order comes from DVC's stage graph,
DVC says whether a stage is up to date, and a stale stage runs through ``dvc repro`` (so
``dvc.lock`` is updated exactly as by hand) with its output streamed into the Prefect log.
However a stage task ends (done, timed out, interrupted, cancelled), its `dvc repro` and the
stage command it started are stopped first; another DVC command holding DVC's lock is waited
for through the task's retries.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import networkx as nx
import psutil
from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.logging import get_run_logger
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from flows.artifacts import StageRow
from flows.dvc_files import keep_whole_copy, repair_dvc_files
from flows.failures import stage_failure
from flows.workspace import forget_stage_session, record_stage_session
from graft.processes import dvc_command, env_with_this_python, stop_session

DVC_LOCKED = "Unable to acquire lock"  # what dvc prints when another dvc command holds the repo
DVC_LOCK_FILE = Path(".dvc", "tmp", "lock")  # DVC's repository lock, under the project root
TAIL_LINES = 20  # of a stage's output, kept for the error when it fails
# Seconds a stopped `dvc repro` gets to stop its stage command and release DVC's locks before
# SIGKILL: DVC needs well under one; an interrupted run must exit within 10 s in all.
STOP_GRACE_S = 3.0
STOPPED_NOTE = "graft: stage {stage} was stopped with its whole process tree"
_STOPPED_PATTERN = re.compile(re.escape(STOPPED_NOTE).replace(re.escape("{stage}"), "(.+)"))

# Every `dvc repro` this process has running, whichever thread waits for it: a run whose
# stages run side by side stops them all when it is interrupted (stop_running_stages).
_running: dict[subprocess.Popen[str], str] = {}
_stopping: set[subprocess.Popen[str]] = set()  # being stopped by stop_running_stages
_running_guard = threading.Lock()


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited with an error or ran past its timeout."""


class DvcLocked(StageFailed):
    """``dvc repro`` of one stage stopped because another DVC command held the repository lock.

    The only failure the stage task retries (see :func:`retry_if_dvc_locked`).
    """


@dataclass(frozen=True)
class StageResult:
    """What one stage task did: ``stage`` (its name), ``ran`` (False: DVC reported it up to
    date and nothing was run), ``seconds`` (the task's wall time, retries included) and
    ``where`` it ran: "workspace", "worktree" (beside other stages, flows/worktrees.py) or
    "pool <name>" (on a worker of that work pool, flows/placement.py)."""

    stage: str
    ran: bool
    seconds: float
    where: str = "workspace"

    def row(self) -> StageRow:
        """This result as a row of the run's stage table: status "ran" or "cached"."""
        return StageRow(self.stage, "ran" if self.ran else "cached", self.seconds, self.where)


# What a stage task returns: its result, or, for a stage DVC reports up to date, Prefect's
# Cached state holding it (see :func:`cached`); :func:`task_result` unwraps either.
StageOutcome = StageResult | State[StageResult]


def cached(result: StageResult) -> State[StageResult]:
    """``result`` of a stage DVC reports up to date, as its task's final state: Prefect's
    ``Cached`` (a Completed state), so that the UI tells it apart from a stage that ran."""
    return Completed(name="Cached", message="up to date in the DVC cache", data=result)


def task_result(outcome: StageOutcome) -> StageResult:
    """The StageResult of a stage task's ``outcome``: a task called directly returns the
    Cached state itself (a future unwraps it). Raises what a failed state holds."""
    if isinstance(outcome, State):
        unwrapped = outcome.result()
        assert isinstance(unwrapped, StageResult), unwrapped
        return unwrapped
    return outcome


@dataclass(frozen=True)
class StageInputs:
    """What one stage reads, split by how it reaches another workspace: ``data``, the deps
    that other stages write (handed over through the DVC cache or remote); ``files``, the
    deps nobody writes, dvc.yaml and the params files, which git carries (paths relative to
    the project root; deps outside it are left out); ``always_changed``: dvc.yaml says
    ``always_changed``, so DVC keeps no run-cache entry of it and it cannot be handed over."""

    data: list[str]
    files: list[str]
    always_changed: bool


@dataclass(frozen=True)
class StageGraph:
    """The stages of one run: ``order`` (every stage after all of its dependencies),
    ``upstream`` (each stage's direct dependencies among them) and ``inputs`` per stage."""

    order: list[str]
    upstream: dict[str, set[str]]
    inputs: dict[str, StageInputs]


def stage_graph(root: Path, targets: list[str] | None = None) -> StageGraph:
    """The stage graph of the DVC project ``root``, as dvc.yaml declares it.

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
        upstream_first = list(
            nx.lexicographical_topological_sort(
                graph.reverse(copy=False), key=lambda stage: declared[stage.name]
            )
        )
        written = {out.def_path for stage in repo.index.stages for out in stage.outs}
        return StageGraph(
            order=[stage.name for stage in upstream_first],
            upstream={s.name: {d.name for d in graph.successors(s)} for s in upstream_first},
            inputs={s.name: _inputs(root, s, written) for s in upstream_first},
        )


def _inputs(root: Path, stage: Any, written: set[str]) -> StageInputs:
    data: set[str] = set()
    files = {"dvc.yaml"}
    for dep in stage.deps:  # params files are deps too
        path = Path(root, dep.def_path).resolve()
        if not path.is_relative_to(root.resolve()):
            continue  # a source folder outside the project: the scan stage's business
        relative = path.relative_to(root.resolve()).as_posix()
        (data if dep.def_path in written else files).add(relative)
    return StageInputs(sorted(data), sorted(files), bool(stage.always_changed))


def stage_order(root: Path, targets: list[str] | None = None) -> list[str]:
    """:func:`stage_graph`'s ``order``: the stage names of the DVC project ``root``, every stage
    after all of its dependencies; with ``targets``, only those and what is upstream of them.
    Raises ValueError naming any target that is not a stage of dvc.yaml."""
    return stage_graph(root, targets).order


def is_up_to_date(root: Path, stage: str) -> bool:
    """DVC's own verdict on ``stage`` of the project ``root``: True when none of its deps,
    outs, params or command changed. Raises DVC's LockError when another DVC command holds
    the repository, and ValueError when dvc.yaml has no such stage."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        (found,) = (s for s in repo.index.stages if s.name == stage)
        return not found.status()


def repro(
    root: Path, stage: str, force: bool, timeout_s: float, pull: bool = False
) -> tuple[int, list[str]]:
    """Run `dvc repro` for one stage of the project ``root``, streaming its output, and stop
    it with its whole process tree however the wait ends: past ``timeout_s`` seconds, or by
    any exception (Ctrl-C, SIGTERM, Prefect's TerminationSignal or cancellation), which then
    propagates with a note naming the stage (see :func:`stopped_stage`). ``pull``: `dvc repro
    --pull`, which fetches the stage's run-cache entry and outputs from the DVC remote.

    Returns the exit code and the last output lines. Raises what interrupted the wait, and
    OSError when `dvc repro` cannot be started or its session not recorded.
    """
    logger = get_run_logger()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    args += ["--pull"] if pull else []
    logger.info("%s: running `%s`", stage, " ".join(["dvc", *args]))
    tail: list[str] = []
    timed_out = threading.Event()

    def time_out() -> None:
        timed_out.set()
        _stop(process)

    timer = threading.Timer(timeout_s, time_out)
    keep_whole_copy(root)  # DVC rewrites dvc.lock in place: killed mid-write, it is cut short
    # A session of its own, so that it can be stopped whole (dvc and the stage command it
    # started) and a terminal's Ctrl-C reaches only graft, which then stops it in order. The
    # stage commands call `python`: this environment's, as `dvc repro` by hand would use.
    process = subprocess.Popen(
        dvc_command(*args), cwd=root, env=env_with_this_python(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    with _running_guard:
        _running[process] = stage
    try:  # at once: from here on, however this ends, the session is stopped
        record_stage_session(root, stage, process.pid)
        timer.start()
        assert process.stdout is not None
        hints = _DvcHints()
        for line in process.stdout:
            if process in _stopping:  # its last words (a KeyboardInterrupt's traceback)
                continue
            if hints.is_hint(line):
                continue
            logger.info("%s | %s", stage, line.rstrip())
            tail = [*tail[-(TAIL_LINES - 1) :], line.rstrip()]
        code = process.wait()
    except BaseException as error:  # Ctrl-C, SIGTERM, a cancelled run, a failed note
        logger.warning(
            "%s: stopping `dvc repro` and its stage command (%s)", stage, type(error).__name__
        )
        error.add_note(STOPPED_NOTE.format(stage=stage))
        raise
    finally:
        timer.cancel()
        try:
            _stop(process)  # nothing to do when it ended by itself, with all it started
        finally:
            with _running_guard:
                _running.pop(process, None)
            forget_stage_session(root)
            if process.stdout is not None:
                process.stdout.close()
            if process.returncode != 0:  # stopped, or failed: perhaps while writing dvc.lock
                _repair_dvc_files(root, stage)
    if timed_out.is_set():
        tail.append(f"timed out after {timeout_s:g}s: stopped with its whole process tree")
    with _running_guard:
        if process in _stopping:
            _stopping.discard(process)
            tail.append("the run was interrupted: stopped with its whole process tree")
    return code, tail


class _DvcHints:
    """Recognises the advice `dvc repro` prints for people at a terminal ("To track the
    changes with git, run:", its indented command, "Use `dvc push` ..."): graft commits and
    pushes itself, so in a run's log it is noise. Everything else DVC prints is kept."""

    STARTS = ("To track the changes with git, run:", "To enable auto staging, run:")
    LINES = ("Use `dvc push` to send your updates to remote storage.",)

    def __init__(self) -> None:
        self._inside = False  # after a hint's first line: its blank and indented lines

    def is_hint(self, line: str) -> bool:
        text = line.rstrip("\n")
        if text.startswith(self.STARTS) or text in self.LINES:
            self._inside = text.startswith(self.STARTS)
            return True
        if self._inside and (not text.strip() or text.startswith(("\t", " "))):
            return True
        self._inside = False
        return False


def stop_running_stages() -> list[str]:
    """Stop every `dvc repro` this process has running (with their stage commands), each as
    a Ctrl-C would, SIGKILL after the grace; the threads waiting for them then see them end.
    Returns the stopped stages' names, in no particular order. Raises nothing."""
    with _running_guard:
        running = dict(_running)
        _stopping.update(running)
    stoppers = [threading.Thread(target=_stop, args=(process,)) for process in running]
    for stopper in stoppers:  # all at once: each may take the whole grace
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    return sorted(running.values())


def _repair_dvc_files(root: Path, stage: str) -> None:
    """:func:`repair_dvc_files`, its repairs logged; while a stage is being stopped, its own
    failure is logged too rather than raised over what stopped the stage."""
    logger = get_run_logger()
    try:
        for line in repair_dvc_files(root):
            logger.warning("%s: %s", stage, line)
    except Exception as error:  # logged, never raised instead of what stopped the stage
        logger.error("%s: could not check DVC's files after the stage: %s", stage, error)


def _stop(process: subprocess.Popen[str]) -> None:
    # SIGINT is what `dvc repro` expects from a Ctrl-C: it passes it on to the stage command,
    # waits for it, then releases its locks. SIGKILL if that takes longer than the grace.
    stop_session(process, STOP_GRACE_S, first_signal=signal.SIGINT)


@contextmanager
def _hangup_raises() -> Iterator[None]:
    """While a stage task runs, a SIGHUP that would kill this process outright (the default,
    as in a worker's flow-run process) raises Prefect's TerminationSignal instead, as Prefect
    does for SIGTERM: the stage is stopped and the run reported Crashed, then Prefect signals
    the process again, which then ends as SIGHUP ends it. `graft run` handles SIGHUP itself."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise TerminationSignal(signal=signum)

    signal.signal(signal.SIGHUP, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def stopped_stage(error: BaseException) -> str | None:
    """The stage that :func:`repro` stopped because of ``error``, or of an exception it was
    raised while handling (a signal delivered twice, as Prefect does with SIGTERM); None when
    no stage was running. Raises nothing."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for note in getattr(current, "__notes__", []):
            found = _STOPPED_PATTERN.fullmatch(note)
            if found:
                return found.group(1)
        current = current.__cause__ or current.__context__
    return None


def retry_if_dvc_locked(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """The stage task's retry condition, in Prefect's form for ``retry_condition_fn``.

    Takes the task, its run and the Failed state of the attempt that just ended. Returns True
    when that attempt raised DvcLocked (another DVC command held the repository lock), False
    for any other failure: a stage that failed on its own fails the same way again. Raises
    what reading the state raises; Prefect then does not retry.
    """
    return isinstance(state.result(raise_on_failure=False), DvcLocked)


@task(name="stage", retry_condition_fn=retry_if_dvc_locked)
def run_stage(root: Path, stage: str, *, force: bool, timeout_s: float) -> StageOutcome:
    """Run ``stage`` of the project ``root`` unless DVC reports it up to date (or ``force``).

    Streams the stage's output into the Prefect log and stops it, with its whole process
    tree, after ``timeout_s`` seconds or when the task is interrupted. Returns what was done.
    Raises DvcLocked when another DVC command holds the repository lock, while DVC is asked
    whether the stage is up to date or during `dvc repro` (the one failure retried, see
    :func:`stage_task`), StageFailed when the stage failed or timed out, and what
    interrupted it (KeyboardInterrupt, TerminationSignal) with the stage named in a note.
    """
    logger = get_run_logger()
    context = TaskRunContext.get()
    assert context is not None  # a task's body always runs in its task run's context
    # Prefect sets the start before the first attempt's body runs; it stays across retries.
    started = context.task_run.start_time or datetime.now(UTC)
    with _hangup_raises():
        if not force and _up_to_date_unless_locked(root, stage):
            logger.info("%s: up to date (DVC cache)", stage)
            return cached(StageResult(stage, ran=False, seconds=_seconds_since(started)))
        code, tail = repro(root, stage, force, timeout_s)
    if code == 0:
        return StageResult(stage, ran=True, seconds=_seconds_since(started))
    message = stage_failure(stage, code, tail)
    if any(DVC_LOCKED in line for line in tail):
        logger.warning("%s: another DVC command holds the repository lock", stage)
        raise DvcLocked(message)
    raise StageFailed(message)


def _up_to_date_unless_locked(root: Path, stage: str) -> bool:
    """:func:`is_up_to_date`, with DVC's LockError turned into one clear log line and
    DvcLocked, which the stage task retries after a wait. A lock left by a DVC process that
    died is no obstacle: it is an fcntl lock, which the kernel released with the process."""
    from dvc.lock import LockError

    try:
        return is_up_to_date(root, stage)
    except LockError:
        holder = _dvc_lock_holder(root)
        get_run_logger().warning(
            "%s: another DVC command (%s) holds the repository lock; waiting to retry",
            stage,
            holder,
        )
        raise DvcLocked(f"stage {stage!r}: another DVC command holds the repository lock") from None


def _dvc_lock_holder(root: Path) -> str:
    """Who holds DVC's repository lock, as well as can be told: "pid N: its command line"
    (zc.lockfile, DVC's lock, writes the holder's pid into the file)."""
    try:
        pid = int((root / DVC_LOCK_FILE).read_text(encoding="utf-8").split()[0])
        command = " ".join(" ".join(psutil.Process(pid).cmdline()).split())  # on one line
    except (OSError, ValueError, IndexError, psutil.Error):
        return "unknown process"
    return f"pid {pid}: {command[:80]}{'...' if len(command) > 80 else ''}"


def stage_task(
    stage: str,
    lock_retries: int,
    body: Task[..., StageOutcome] | None = None,
    name: str | None = None,
) -> Task[..., StageOutcome]:
    """``body`` (default :func:`run_stage`) as the task for ``stage``: named ``name`` (default
    the stage's), and retried up to ``lock_retries`` times while DVC's lock is held, 1, 2, 4,
    ... seconds apart (no other failure is retried; past 50 retries each waits as long as the
    50th). Returns the task, ready to call or submit. Raises nothing for ``lock_retries`` >= 0,
    as params.yaml's are."""
    return (body or run_stage).with_options(
        name=name or stage,
        retries=lock_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_condition_fn=retry_if_dvc_locked,
    )


def _seconds_since(started: datetime) -> float:
    return (datetime.now(UTC) - started).total_seconds()
