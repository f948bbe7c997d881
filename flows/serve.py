"""Serve prefect.yaml's deployments from this machine: schedules without a work pool or worker.

`prefect deploy` + a worker is the multi-machine way; `graft serve` is the single-machine one. It
reads the same deployments (names, schedules, parameters, concurrency limits) from prefect.yaml,
so the schedule is written once, and executes their flow runs on this machine until stopped.
The workspace is the project root it was started for.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, RRule, Schedule

from flows.pipeline import pipeline


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

    Registers them with the Prefect server at PREFECT_API_URL and runs their flow runs in this
    process, one at a time; on the way out, however it stops, pauses their schedules. Returns
    after Ctrl-C; a SIGTERM ends it with SystemExit(0) from Prefect's handler, which Prefect
    installs only once the deployments are announced: an entry point that wants an earlier
    SIGTERM to exit cleanly too must turn it into SystemExit itself (`graft serve` does).
    Raises DeploymentSpecError for a deployment it cannot serve (see :func:`deployments_for`).
    """
    deployments = deployments_for(root)
    try:
        serve(*deployments, limit=1)
    finally:
        # Nothing runs these deployments once this process is gone: pause their schedules so
        # runs do not pile up as Late. Serving again re-registers them with prefect.yaml's.
        pause_schedules(pipeline.name, [d.name for d in deployments])


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
