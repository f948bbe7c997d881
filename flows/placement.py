"""Placement: a stage runs on a worker of the Prefect work pool ``run.placement`` names.

The orchestrating run pushes the stage's data dependencies to the DVC remote and starts a run
of the ``graft-stage/<pool>`` deployment (flow :func:`placed_stage`, created on demand in that
pool; a subflow of the orchestrating run). A worker of the pool runs it in its own clone of
the repository (``GRAFT_WORKSPACE``, which `graft worker` sets to the clone it is started in):
in the stage's work tree at the orchestrator's commit (flows/worktrees.py) it writes the
orchestrator's ``dvc.lock``, pulls the dependencies, runs the stage with `dvc repro` as a
local stage runs, and pushes the outputs with the stage's run-cache entry. The orchestrator
relays the run's log into its own while it waits, then runs `dvc repro --pull` of the stage:
DVC finds the run-cache entry and checks the outputs out without running the stage, and
records it in ``dvc.lock`` exactly as a local `dvc repro` would have.

Same code everywhere: the worker runs the orchestrator's commit, so a stage whose files (its
code deps, dvc.yaml, params files) have uncommitted changes is refused before any work, naming
them; the commit must be reachable from the worker clone's ``origin`` (pushed).
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_client
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
from prefect.client.schemas.objects import FlowRun, State, WorkerStatus
from prefect.client.schemas.sorting import LogSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling
from prefect.utilities.callables import parameter_schema

from flows.artifacts import artifact_key
from flows.crash_detection import ensure_crash_automation
from flows.dvc_commands import pull, push, push_stage
from flows.failures import placed_failure, stage_failure
from flows.stages import (
    StageFailed,
    StageGraph,
    repro,
    stage_graph,
    stage_task,
    task_result,
)
from flows.workspace import workspace_lock
from flows.worktrees import (
    WorktreeError,
    git,
    head_commit,
    stage_worktree,
    uncommitted,
    write_lock_file,
)

STAGE_FLOW = "graft-stage"
ENTRYPOINT = "flows/placement.py:placed_stage"
WORKSPACE_ENV = "GRAFT_WORKSPACE"  # the worker's clone; its flow runs change into it
POLL_S = 1.0  # how often the orchestrator reads the placed run's state and new log lines
PICKUP_NOTE_S = 60.0  # how often a placed run no worker has started yet is mentioned
LOG_SETTLE_S = 3.0  # after the run ends: logs reach the server in batches (every 2 s)
CACHED_NOTE = "is cached - skipping run"  # what `dvc repro` prints when the run-cache hands over
# What it prints when nothing had to run: dvc.lock already records the same result (as in a
# fresh clone of a committed run), or the stage is current.
UNCHANGED_NOTES = ("didn't change, skipping", "Data and pipelines are up to date")

# The placed runs this process is waiting for: an interrupted orchestrator cancels them.
_children: set[UUID] = set()
_children_guard = threading.Lock()


class PlacementError(ValueError):
    """``run.placement`` cannot be followed: the message names the key and what to do."""


# -- on the worker ----------------------------------------------------------------------------


@flow(name=STAGE_FLOW, log_prints=True)
def placed_stage(
    stage: str,
    commit: str,
    dvc_lock: str,
    force: bool = False,
    timeout_s: float = 3600.0,
    lock_retries: int = 5,
) -> dict[str, Any]:
    """Run ``stage`` of the orchestrator's pipeline here, on a worker of its work pool.

    Runs in the worker's clone (the working directory the deployment's pull step sets): in
    the stage's work tree at ``commit`` with the orchestrator's ``dvc_lock`` (the text of its
    dvc.lock), pulls the stage's data dependencies from the DVC remote, runs `dvc repro` of
    the stage (``force``: even when up to date; stopped after ``timeout_s`` seconds), then
    pushes its outputs and run-cache entry. Returns and publishes (artifact
    ``graft-<clone>-placed-<stage>``, flows/artifacts.py) where it ran and the seconds of
    each step. Raises StageFailed when the commit is not reachable or the stage fails,
    WorktreeError when git fails,
    DvcDataError when DVC cannot pull or push (DvcLocked: its repository is busy).
    """
    logger = get_run_logger()
    clone = Path.cwd().resolve()
    host = socket.gethostname()
    logger.info("%s: on %s in %s at commit %s", stage, host, clone, commit[:12])
    _fetch_commit(clone, commit)
    started = datetime.now(UTC)
    worktree = stage_worktree(clone, stage, commit)
    with workspace_lock(worktree, wait_s=0):  # one run of a stage per clone; orphans stopped
        write_lock_file(worktree, dvc_lock)
        data = stage_graph(worktree, [stage]).inputs[stage].data
        pull_s = _timed(lambda: pull(worktree, data) if data else None)
        clock = time.monotonic()
        outcome = stage_task(stage, lock_retries)(worktree, stage, force=force, timeout_s=timeout_s)
        result = task_result(outcome)
        run_s = time.monotonic() - clock
        push_s = _timed(lambda: push_stage(worktree, stage))
    record = {
        "stage": stage, "host": host, "workspace": str(worktree), "commit": commit,
        "started": started.isoformat(), "ended": datetime.now(UTC).isoformat(),
        "ran": result.ran, "pull_s": round(pull_s, 2), "run_s": round(run_s, 2),
        "push_s": round(push_s, 2),
    }  # fmt: skip
    logger.info(
        "%s: pulled in %.1fs, %s in %.1fs, pushed in %.1fs",
        stage, pull_s, "ran" if result.ran else "up to date", run_s, push_s,
    )  # fmt: skip
    create_table_artifact(
        key=artifact_key(clone, f"placed-{stage}"),
        table=[record],
        description=f"Where and how long stage {stage} ran on its work pool's worker.",
    )
    return record


def _fetch_commit(clone: Path, commit: str) -> None:
    """Make ``commit`` available in ``clone``, fetching from its ``origin`` if need be."""
    try:
        git(clone, "cat-file", "-e", f"{commit}^{{commit}}")
        return
    except WorktreeError:
        pass
    try:
        git(clone, "fetch", "--quiet", "origin")
        git(clone, "cat-file", "-e", f"{commit}^{{commit}}")
    except WorktreeError as error:
        raise StageFailed(
            f"commit {commit[:12]} is not in the worker's clone {clone} nor in its origin: "
            f"push it where the worker fetches from ({error})"
        ) from None


def _timed(step: Any) -> float:
    clock = time.monotonic()
    step()
    return time.monotonic() - clock


# -- on the orchestrator ----------------------------------------------------------------------


def check_placement(
    project: Path, placement: dict[str, str], every_stage: list[str], graph: StageGraph
) -> None:
    """Refuse ``run.placement`` before any work when it cannot be followed: a stage not in
    dvc.yaml, an ``always_changed`` stage (no run-cache entry to hand back), no default DVC
    remote, uncommitted changes to the files a placed stage depends on, a work pool missing
    from the Prefect server (a pool with no worker online is only warned about: see
    :func:`require_worker`). Only stages of this run (``graph``)
    are checked beyond their names. With stages to place, also keeps the server's crash
    automation in place (flows/crash_detection.py). Raises PlacementError naming the key,
    and what the Prefect client raises; returns None."""
    from graft.registry.publish import default_remote

    unknown = sorted(set(placement) - set(every_stage))
    if unknown:
        raise PlacementError(f"run.placement names stages not in dvc.yaml: {', '.join(unknown)}")
    placed = [stage for stage in graph.order if stage in placement]
    if not placed:
        return
    for stage in placed:
        if graph.inputs[stage].always_changed:
            raise PlacementError(
                f"run.placement.{stage}: an always_changed stage has no run-cache entry to "
                "hand its outputs back with; run it in the orchestrating workspace"
            )
    if default_remote(project) is None:
        raise PlacementError(
            f"run.placement: placed stages ({', '.join(placed)}) hand data over through the "
            "default DVC remote, and none is configured: `dvc remote add -d <name> <url>`"
        )
    for stage in placed:
        changed = uncommitted(project, graph.inputs[stage].files)
        if changed:
            raise PlacementError(
                f"run.placement.{stage}: uncommitted changes to files it depends on: "
                f"{', '.join(changed)}; the worker runs the committed code: commit and push "
                "them first"
            )
    for stage in placed:
        _check_pool(stage, placement[stage])
    # A worker that dies mid-stage stops sending heartbeats: this automation marks its run
    # Crashed, which ends the wait for it (else the wait lasts run.timeout_s).
    ensure_crash_automation()


def _check_pool(stage: str, pool: str) -> None:
    """Refuse a pool missing from the server; warn when none of its workers is online now.
    A worker is required only when the stage has to run (see :func:`require_worker`): a run
    with nothing new for a placed stage needs no GPU box switched on."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise PlacementError(
                f"run.placement.{stage}: no work pool {pool!r} on the Prefect server at "
                f"{PREFECT_API_URL.value()}: start its worker in a clone of this repository "
                f"on the machine for it, `graft worker {pool}`, which creates the pool"
            ) from None
    if not _worker_online(pool):
        get_run_logger().warning(
            "run.placement.%s: no worker of work pool %r is online now; the stage fails if "
            "it has to run and none is by then (`graft worker %s` on the machine for it)",
            stage, pool, pool,
        )  # fmt: skip


def _worker_online(pool: str) -> bool:
    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return any(worker.status == WorkerStatus.ONLINE for worker in workers)


def require_worker(stage: str, pool: str) -> None:
    """Raise StageFailed unless a worker of work pool ``pool`` is online to run ``stage``.
    Prefect marks a stopped worker offline only after a few missed heartbeats (about two
    minutes): a run placed in that window waits, saying so (:func:`await_placed`)."""
    if not _worker_online(pool):
        raise StageFailed(
            f"stage {stage!r} has to run on work pool {pool!r}, and no worker of it is "
            f"online: start one in a clone of this repository on the machine for it: "
            f"`graft worker {pool}`"
        )


def ensure_stage_deployment(pool: str) -> UUID:
    """The ``graft-stage/<pool>`` deployment, created or updated in work pool ``pool``: its
    flow runs :func:`placed_stage` in the worker's clone (``$GRAFT_WORKSPACE``). Returns its
    id. Raises what the Prefect client raises."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(STAGE_FLOW)
        return client.create_deployment(
            flow_id=flow_id,
            name=pool,
            work_pool_name=pool,
            entrypoint=ENTRYPOINT,
            pull_steps=[
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": f"{{{{ ${WORKSPACE_ENV} }}}}"
                    }
                }
            ],
            parameter_openapi_schema=parameter_schema(placed_stage).model_dump_for_openapi(),
            enforce_parameter_schema=True,
            description="One stage of a graft pipeline, run by a worker of this pool in its "
            "clone; started by the orchestrating run (flows/placement.py).",
            tags=["graft", "placed-stage"],
        )


def dispatch(
    project: Path,
    stage: str,
    pool: str,
    data: list[str],
    parameters: dict[str, Any],
) -> UUID:
    """Push ``data`` (the stage's data dependencies) from the project ``project`` to the DVC
    remote and start a run of ``stage`` on work pool ``pool``: the ``graft-stage/<pool>``
    deployment with ``parameters`` (those of :func:`placed_stage`), as a subflow of the
    calling run. Hold the workspace's DVC while calling. Returns the placed run's id. Raises
    StageFailed when no worker of the pool is online, DvcDataError when the push fails
    (DvcLocked: another DVC command holds the project), and what the Prefect client raises."""
    logger = get_run_logger()
    require_worker(stage, pool)
    if data:
        logger.info("%s: pushing %s to the DVC remote for pool %s", stage, ", ".join(data), pool)
        push(project, data)
    child: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here: a FlowRun
        ensure_stage_deployment(pool), parameters=parameters, timeout=0, as_subflow=True
    )
    logger.info("%s: placed on work pool %s as flow run %s", stage, pool, child.name)
    return child.id


def await_placed(flow_run_id: UUID, stage: str, pool: str, timeout_s: float) -> None:
    """Wait for the placed run ``flow_run_id`` of ``stage``, relaying its log; cancel it past
    ``timeout_s`` seconds or when interrupted (then re-raise). Raises StageFailed, with the
    placed run's own message (the stage's last output lines), unless it completed."""
    state = _follow(flow_run_id, f"{stage}@{pool}", timeout_s, pool)
    if not state.is_completed():
        raise StageFailed(placed_failure(stage, pool, state.name or "", state.message or ""))


def take_over(project: Path, stage: str, pool: str, timeout_s: float) -> None:
    """Record the placed ``stage``'s result in the project ``project``: `dvc repro --pull`,
    which fetches its run-cache entry and outputs from the DVC remote and checks them out
    without running it. Hold the workspace's DVC while calling. Raises StageFailed when DVC
    fails; logs a warning when the run-cache did not match and DVC ran the stage here."""
    code, tail = repro(project, stage, force=False, timeout_s=timeout_s, pull=True)
    if code != 0:
        what = f"ran on work pool {pool!r}, but its result could not be taken over"
        raise StageFailed(stage_failure(stage, code, tail, what))
    if ran_again(tail):
        get_run_logger().warning(
            "%s: the run-cache entry from pool %s did not match here; DVC ran it again", stage, pool
        )


def ran_again(tail: list[str]) -> bool:
    """Whether the take-over's `dvc repro --pull` ran the stage's command (its last output
    lines ``tail`` say neither "cached" nor "up to date"): the run-cache entry from the pool
    did not match here."""
    handed_over = (CACHED_NOTE, *UNCHANGED_NOTES)
    return not any(note in line for line in tail for note in handed_over)


def _follow(flow_run_id: UUID, label: str, timeout_s: float, pool: str) -> State[Any]:
    """Wait for the flow run ``flow_run_id`` to end, relaying its log lines as ``label |
    line``; say every PICKUP_NOTE_S seconds while no worker of ``pool`` has started it;
    cancel it after ``timeout_s`` seconds or when the wait is interrupted (then re-raise).
    Returns its final state."""
    logger = get_run_logger()
    with _children_guard:
        _children.add(flow_run_id)
    seen: set[UUID] = set()
    since = datetime.now(UTC) - timedelta(minutes=1)
    started = time.monotonic()
    deadline = started + timeout_s
    next_note = started + PICKUP_NOTE_S
    try:
        with get_client(sync_client=True) as client:
            settled_at: float | None = None
            while True:
                since = _relay(client, flow_run_id, label, seen, since)
                state = client.read_flow_run(flow_run_id).state
                final = state is not None and state.is_final()
                waiting = state is not None and (state.is_scheduled() or state.is_pending())
                if waiting and time.monotonic() >= next_note:
                    logger.warning(
                        "%s: no worker of work pool %r has started it after %.0fs: is "
                        "`graft worker %s` running on the machine for it? (cancelled after "
                        "run.timeout_s, %gs)",
                        label, pool, time.monotonic() - started, pool, timeout_s,
                    )  # fmt: skip
                    next_note += PICKUP_NOTE_S
                if final and settled_at is None:
                    settled_at = time.monotonic() + LOG_SETTLE_S
                if settled_at is not None and time.monotonic() >= settled_at:
                    assert state is not None
                    return state
                if not final and time.monotonic() > deadline:
                    logger.error("%s: timed out after %gs; cancelling it", label, timeout_s)
                    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
                    deadline = float("inf")  # the cancelled state ends the wait
                time.sleep(POLL_S)
    except BaseException:
        cancel_placed_runs()
        raise
    finally:
        with _children_guard:
            _children.discard(flow_run_id)


def _relay(
    client: SyncPrefectClient, flow_run_id: UUID, label: str, seen: set[UUID], since: datetime
) -> datetime:
    logger = get_run_logger()
    # Lines reach the server in batches, not always in order: read from a little before the
    # newest line seen, and skip those already relayed.
    log_filter = LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
        # pydantic takes a datetime where Prefect's annotation names pendulum's DateTime
        timestamp=LogFilterTimestamp(after_=cast(Any, since - timedelta(seconds=10))),
    )
    offset = 0
    while True:  # the server answers at most 200 lines at a time
        page = client.read_logs(
            log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=200, offset=offset
        )
        for log in page:
            if log.id not in seen:
                seen.add(log.id)
                logger.log(log.level, "%s | %s", label, log.message)
                since = max(since, log.timestamp)
        offset += len(page)
        if len(page) < 200:
            break
    return since


def cancel_placed_runs() -> list[UUID]:
    """Ask the Prefect server to cancel every placed run this process waits for (their
    workers then stop them, stage and all). Returns their ids. Raises nothing: a server that
    cannot be reached is logged, as the run is ending anyway."""
    with _children_guard:
        children = sorted(_children)
    if not children:
        return []
    try:
        with get_client(sync_client=True) as client:
            for child in children:
                client.set_flow_run_state(child, Cancelling(), force=True)
    except Exception as error:  # ending anyway: say so, do not hide what ended it
        get_run_logger().error("could not cancel the placed runs %s: %s", children, error)
    return children


def orchestrator_commit(project: Path) -> str:
    """The commit placed stages run at: the project's HEAD. Raises PlacementError when it has
    none (no git repository or no commit)."""
    try:
        return head_commit(project)
    except WorktreeError as error:
        raise PlacementError(f"run.placement: placed stages run a git commit: {error}") from None
