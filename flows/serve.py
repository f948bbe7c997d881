"""Serve prefect.yaml's deployments from this machine: schedules without a work pool or worker.

`prefect deploy` + a worker is the multi-machine way; `graft serve` is the single-machine one. It
reads the same deployments (names, schedules, parameters, concurrency limits) from prefect.yaml,
so the schedule is written once, and executes their flow runs on this machine until stopped.
The workspace is the project root it was started for.
"""

from __future__ import annotations

import os
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import yaml
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, StateType
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, RRule, Schedule
from prefect.states import Crashed

from flows.crash_detection import HEARTBEAT_ENV
from flows.pipeline import pipeline
from flows.workspace import WorkspaceBusy, workspace_lock

STOP_GRACE_S = 8.0  # a flow run's own SIGTERM handling stops its stage and reports; then SIGKILL


class DeploymentSpecError(ValueError):
    """prefect.yaml holds something `graft serve` cannot serve."""


def _schedule(spec: dict[str, Any], where: str) -> Schedule:
    timezone, active = spec.get("timezone"), bool(spec.get("active", True))
    kinds = [kind for kind in ("cron", "interval", "rrule") if kind in spec]
    if len(kinds) != 1:
        raise DeploymentSpecError(f"{where}: give exactly one of cron, interval or rrule")
    if "cron" in spec:
        return Cron(str(spec["cron"]), timezone=timezone, active=active)
    if "interval" in spec:
        return Interval(
            timedelta(seconds=float(spec["interval"])), timezone=timezone, active=active
        )
    return RRule(str(spec["rrule"]), timezone=timezone, active=active)


def _concurrency(spec: int | dict[str, Any] | None) -> ConcurrencyLimitConfig | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        return ConcurrencyLimitConfig(limit=spec)
    return ConcurrencyLimitConfig(
        limit=spec["limit"], collision_strategy=spec.get("collision_strategy", "ENQUEUE")
    )


def deployments_for(root: Path) -> list[RunnerDeployment]:
    """prefect.yaml's deployments of the pipeline, as deployments to serve for the project ``root``.

    Reads ``root/prefect.yaml``: each deployment keeps its name, description, tags, schedules,
    parameters and concurrency limit, with the ``root`` parameter set to the project. Returns
    them in the file's order. Raises DeploymentSpecError when a deployment is not of
    flows/pipeline.py:pipeline, a schedule is not exactly one of cron, interval (seconds) or
    rrule, or there is none; OSError and yaml.YAMLError when the file cannot be read.
    """
    config_path = root / "prefect.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    served: list[RunnerDeployment] = []
    for spec in config.get("deployments") or []:
        name = spec["name"]
        where = f"{config_path}: deployment {name!r}"
        if spec.get("entrypoint") != "flows/pipeline.py:pipeline":
            raise DeploymentSpecError(f"{where}: graft serves only flows/pipeline.py:pipeline")
        schedules = [
            _schedule(s, f"{where}, schedule {i + 1}")
            for i, s in enumerate(spec.get("schedules") or [])
        ]
        deployment = pipeline.to_deployment(
            name=name,
            description=spec.get("description"),
            tags=spec.get("tags"),
            schedules=schedules,
            # A served run starts in this process's folder: name the workspace explicitly.
            parameters={**(spec.get("parameters") or {}), "root": str(root.resolve())},
            concurrency_limit=_concurrency(spec.get("concurrency_limit")),
            # A module path: `graft serve` puts the project root on PYTHONPATH for the flow-run
            # processes, so it resolves wherever serve was started from.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        assert isinstance(deployment, RunnerDeployment)  # sync call: not a coroutine
        served.append(deployment)
    if not served:
        raise DeploymentSpecError(f"{config_path} declares no deployments")
    return served


def serve_deployments(root: Path) -> None:
    """Serve prefect.yaml's deployments for the project ``root`` until stopped.

    Registers them with the Prefect server at PREFECT_API_URL and runs their flow runs as
    child processes of this one, one at a time, each sending the heartbeat crash detection
    needs (sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY in this process's environment for them). On
    the way out, however it stops, it stops the runs still going (:func:`stop_flow_runs`) and
    any stage they left running, and pauses the deployments' schedules. Returns after Ctrl-C;
    a SIGTERM ends it with SystemExit(0) from Prefect's handler, which Prefect installs only
    once the deployments are announced: an entry point that wants an earlier SIGTERM to exit
    cleanly too must turn it into SystemExit itself (`graft serve` does). Raises
    DeploymentSpecError for a deployment it cannot serve (see :func:`deployments_for`).
    """
    deployments = deployments_for(root)
    os.environ.update(HEARTBEAT_ENV)  # inherited by the flow-run processes the runner starts
    try:
        serve(*deployments, limit=1)
    finally:
        try:
            stop_flow_runs([d.name for d in deployments])
            # Prefect's runner may have killed a run's process before the run could stop its
            # stage: taking the workspace, now free, stops such an orphan (flows/workspace.py).
            with suppress(WorkspaceBusy), workspace_lock(root, wait_s=0):
                pass
        finally:
            # Nothing runs these deployments once this process is gone: pause their schedules
            # so runs do not pile up as Late. Serving again re-registers them as prefect.yaml has.
            pause_schedules(pipeline.name, [d.name for d in deployments])


def stop_flow_runs(deployments: list[str], grace_s: float = STOP_GRACE_S) -> list[UUID]:
    """Stop the flow runs this process executes, and leave none of the served ``deployments``
    (names, of the flow ``graft-pipeline``) with a run that is going but has no process.

    The runner executes each run in a descendant process whose environment names the run
    (PREFECT__FLOW_RUN_ID). Each gets SIGTERM, on which the flow stops its stage's process
    tree and reports the run Crashed; one still alive after ``grace_s`` seconds gets SIGKILL.
    Then every run of the deployments still Pending, Running or Cancelling on the server is
    set Crashed: only this process runs them, so none of them has a process any more; this
    releases their deployment's concurrency slot at once. Returns the ids of the runs set
    Crashed. Raises Prefect's and httpx's errors when the server cannot be reached.
    """
    processes = []
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):  # exited meanwhile, or not ours to read
            if "PREFECT__FLOW_RUN_ID" in process.environ():
                processes.append(process)
    for process in processes:
        with suppress(psutil.NoSuchProcess):  # exited since the listing
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    crashed = []
    going = FlowRunFilterStateType(
        any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    )
    with get_client(sync_client=True) as client:
        for name in deployments:
            try:
                deployment = client.read_deployment_by_name(f"{pipeline.name}/{name}")
            except ObjectNotFound:  # stopped before it was registered: nothing ran
                continue
            for flow_run in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=going)),
            ):
                message = "graft serve stopped while this run was going; its stage was stopped"
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                crashed.append(flow_run.id)
    return crashed


def pause_schedules(flow_name: str, names: list[str]) -> None:
    """Deactivate every schedule of the deployments ``names`` of the flow ``flow_name``.

    Talks to the Prefect server at PREFECT_API_URL; a deployment the server does not know is
    skipped. Returns nothing. Raises Prefect's and httpx's errors when the server cannot be
    reached or refuses the update.
    """
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(f"{flow_name}/{name}")
            except ObjectNotFound:  # stopped before it was registered: nothing to pause
                continue
            for schedule in deployment.schedules:
                if schedule.active:
                    client.update_deployment_schedule(deployment.id, schedule.id, active=False)
