"""The Prefect flow: one task per DVC stage, in DVC's order, with DVC deciding what runs.

dvc.yaml stays the only declaration of the pipeline. The flow reads the stage graph from DVC,
asks DVC whether each stage is up to date, and runs a stale one through ``dvc repro`` (so
``dvc.lock`` is updated exactly as by hand). A stage DVC reports up to date is a task that
completes at once and says so. Independent stages run side by side, placed ones on their work
pool's workers (flows/concurrent_stages.py, flows/placement.py). A failed stage fails its
task and the flow; nothing downstream of it runs. The stages' tasks are in flows/stages.py,
the workspace lock in flows/workspace.py.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_client, tags, task
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled

from flows.artifacts import StageRow, publish_run_artifacts, workspace_label
from flows.concurrent_stages import run_stage_graph
from flows.crash_detection import HeartbeatMisconfigured, check_heartbeat, ensure_crash_automation
from flows.failures import first_line, quiet_expected_failures
from flows.missed_runs import MissedRuns, skip_reason
from flows.placement import PlacementError, check_placement
from flows.stages import StageFailed, StageGraph, StageResult, stage_graph, stage_order
from flows.workspace import WorkspaceBusy, workspace_lock
from graft.config.checks import check_machine
from graft.config.params import Params, load_params
from graft.errors import GraftError
from graft.processes import run_dvc

# Failures graft expects and explains in their message's first line: Prefect's engine logs
# them without a traceback (flows/failures.py).
EXPECTED_FAILURES = (StageFailed, PlacementError, WorkspaceBusy, HeartbeatMisconfigured, GraftError)


def _sync_with_remote(root: Path, *command: str) -> None:
    """`dvc pull` or `dvc push` when a default DVC remote is configured; say so when none is."""
    from graft.registry.publish import default_remote  # publish asks DVC the same question

    logger = get_run_logger()
    if default_remote(root) is None:
        logger.info("%s: no DVC remote configured; nothing to %s", command[0], command[0])
        return
    logger.info("dvc %s: %s", command[0], run_dvc(root, *command, check=True).stdout.strip())


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


def _run_name() -> str:
    """The flow run's name: the workspace's folder and the start time, e.g.
    ``main-20261207-014022``, so that runs of several clones tell apart in the UI."""
    root = Path(str(current_flow_run.parameters.get("root", "."))).resolve()
    return f"{root.name}-{datetime.now():%Y%m%d-%H%M%S}"


def _tag_run(flow_run: FlowRun | None, labels: list[str]) -> None:
    """Add ``labels`` to the running flow run's tags (a run started by hand has none)."""
    if flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *labels}))


def _stage_rows(graph: StageGraph, outcomes: dict[str, StageResult | Exception]) -> list[StageRow]:
    """The stage table of a run that failed: each stage's result, "failed", or "not run"."""
    rows = []
    for stage in graph.order:
        outcome = outcomes.get(stage)
        if isinstance(outcome, StageResult):
            rows.append(outcome.row())
        else:
            rows.append(StageRow(stage, "failed" if outcome else "not run", None))
    return rows


def _report_failure(
    project: Path, params: Params, rows: list[StageRow], error: BaseException
) -> None:
    """Log why the run failed at ERROR, in one line, and publish what it did (the stage table
    and the reports of stages that finished) with that line first. A report that cannot be
    read is logged, never raised over the failure itself."""
    logger = get_run_logger()
    reason = first_line(error)
    logger.error("run failed: %s", reason)
    try:
        publish_run_artifacts(project, params, rows, failure=reason)
    except Exception as unreadable:  # the run's own failure is what must surface
        logger.warning("could not publish this run's reports: %s", unreadable)


@flow(name="graft-pipeline", log_prints=True, flow_run_name=_run_name)
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
    missed_runs: MissedRuns = "latest",
    missed_after_s: float = 3600.0,
) -> list[StageResult] | State[None]:
    """Run the DVC pipeline in the project ``root``, one task per stage, in DVC's order.

    ``stages`` limits the run to those stages and what they depend on; ``force`` runs them
    even when DVC reports them up to date. ``pull``/``push`` sync data with the DVC remote
    when one is configured. ``publish`` then registers the model as the next version
    (``publish_bump``), optionally assigning it ``publish_stage``, exactly as `graft publish`
    does. ``wait_for_workspace_s``: seconds to wait for another run in the same workspace.
    ``missed_runs`` and ``missed_after_s`` (seconds): what a scheduled run that came due while
    nothing ran the deployment does (flows/missed_runs.py); a run they skip returns a Cancelled
    state saying why, before any other work. A deployment's run first checks its heartbeat
    setting and keeps the server's crash automation in place (flows/crash_detection.py).
    Returns one result per stage run, in order. Raises ParamsError for bad params.yaml,
    ValueError for unknown stage names, PlacementError when ``run.placement`` cannot be
    followed (flows/placement.py), WorkspaceBusy when the wait runs out, StageFailed
    (DvcLocked once lock retries are exhausted) when a stage or publish fails,
    subprocess.CalledProcessError when `dvc pull`/`dvc push` fails; HeartbeatMisconfigured when
    a deployment's run sends heartbeats too rarely for crash detection.
    """
    logger = get_run_logger()
    quiet_expected_failures(*EXPECTED_FAILURES)
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    project = Path(root).resolve()
    labels = ["graft", f"workspace:{workspace_label(project)}"]
    _tag_run(flow_run, labels)
    skipped = skip_reason(flow_run, missed_runs, missed_after_s)
    if skipped:
        logger.info("%s", skipped)
        return Cancelled(message=skipped)
    if flow_run is not None and flow_run.deployment_id is not None:
        check_heartbeat()  # before the automation could take a live run for a dead one
        if ensure_crash_automation():
            logger.info("crash detection: the server's automation was created or updated")
    params = load_params(project / "params.yaml")  # bad params fail before any stage runs
    check_machine(params, project, origin=str(project / "params.yaml"))
    settings = params.run
    every_stage = stage_order(project)
    graph = stage_graph(project, stages) if stages else stage_graph(project)
    unknown = sorted(set(settings.timeout_s) - set(every_stage) - {"default"})
    if unknown:
        raise ValueError(f"run.timeout_s names stages not in dvc.yaml: {', '.join(unknown)}")
    check_placement(project, settings.placement, every_stage, graph)
    with workspace_lock(project, wait_for_workspace_s), tags(*labels):
        if pull:
            _sync_with_remote(project, "pull", "--allow-missing")
        # Each stage once its upstream is done; a failure raises once the stages running
        # beside it have ended, so nothing downstream of it runs.
        outcomes: dict[str, StageResult | Exception] = {}
        try:
            results = run_stage_graph(project, graph, settings, force, outcomes)
        except Exception as error:
            _report_failure(project, params, _stage_rows(graph, outcomes), error)
            raise
        if push:
            _sync_with_remote(project, "push")
        publish_run_artifacts(project, params, [r.row() for r in results])
        if publish:  # still holding the workspace: it commits dvc.lock and tags the commit
            _publish(project, bump=publish_bump, stage=publish_stage)
    return results
