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

from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import Cancelled

from flows.artifacts import publish_run_artifacts
from flows.concurrent_stages import run_stage_graph
from flows.crash_detection import check_heartbeat, ensure_crash_automation
from flows.missed_runs import MissedRuns, skip_reason
from flows.placement import check_placement
from flows.stages import StageFailed, StageResult, stage_graph, stage_order
from flows.workspace import workspace_lock
from graft.config.checks import check_machine
from graft.config.params import load_params
from graft.processes import run_dvc


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
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    skipped = skip_reason(flow_run, missed_runs, missed_after_s)
    if skipped:
        logger.info("%s", skipped)
        return Cancelled(message=skipped)
    if flow_run is not None and flow_run.deployment_id is not None:
        check_heartbeat()  # before the automation could take a live run for a dead one
        if ensure_crash_automation():
            logger.info("crash detection: the server's automation was created or updated")
    project = Path(root).resolve()
    params = load_params(project / "params.yaml")  # bad params fail before any stage runs
    check_machine(params, project, origin=str(project / "params.yaml"))
    settings = params.run
    every_stage = stage_order(project)
    graph = stage_graph(project, stages) if stages else stage_graph(project)
    unknown = sorted(set(settings.timeout_s) - set(every_stage) - {"default"})
    if unknown:
        raise ValueError(f"run.timeout_s names stages not in dvc.yaml: {', '.join(unknown)}")
    check_placement(project, settings.placement, every_stage, graph)
    with workspace_lock(project, wait_for_workspace_s):
        if pull:
            _sync_with_remote(project, "pull", "--allow-missing")
        # Each stage once its upstream is done; a failure raises once the stages running
        # beside it have ended, so nothing downstream of it runs.
        results = run_stage_graph(project, graph, settings, force)
        if push:
            _sync_with_remote(project, "push")
        publish_run_artifacts(project, params, [r.row() for r in results])
        if publish:  # still holding the workspace: it commits dvc.lock and tags the commit
            _publish(project, bump=publish_bump, stage=publish_stage)
    return results
