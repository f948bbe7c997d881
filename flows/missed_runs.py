"""Missed schedules: what a deployment does with the runs that came due while nothing ran them.

Prefect's scheduler creates a deployment's runs ahead of time. When no worker (or `graft serve`)
ran through several scheduled times, every one of them is due at once when one comes back, and
with a one-at-a-time deployment they would run one after another: the same images trained on
again and again. Each scheduled run therefore first applies the deployment's ``missed_runs``
policy (a flow parameter, set per deployment in prefect.yaml):

- ``latest`` (the default): a scheduled run that a later scheduled run of the same deployment
  has already come due after is superseded and skipped; the latest due run runs.
- ``all``: every due run runs, in turn.
- ``none``: a scheduled run that starts more than ``missed_after_s`` seconds after its
  scheduled time is skipped; the deployment waits for its next scheduled time.

A skipped run ends Cancelled, its message saying why; it takes no workspace, runs no stage and
publishes nothing. Runs started by hand (UI, `prefect deployment run`, `graft run`) always run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort

MissedRuns = Literal["latest", "all", "none"]


def skip_reason(flow_run: FlowRun | None, policy: MissedRuns, missed_after_s: float) -> str | None:
    """Why ``flow_run`` should be skipped under ``policy``; None when it should run.

    ``flow_run`` is the run being started (None outside a flow run: it runs). Only runs the
    scheduler created for a deployment are ever skipped. ``missed_after_s`` (seconds) is how
    late a run may start under ``none``. Reads the deployment's other runs from the server at
    PREFECT_API_URL for ``latest``. Raises ValueError for an unknown policy, and Prefect's and
    httpx's errors when the server cannot be read.
    """
    if policy not in ("latest", "all", "none"):
        raise ValueError(f"missed_runs must be latest, all or none, not {policy!r}")
    if policy == "all" or flow_run is None or not _scheduled(flow_run):
        return None
    assert flow_run.expected_start_time is not None  # _scheduled checked it
    due = flow_run.expected_start_time
    now = datetime.now(UTC)
    if policy == "none":
        late_s = (now - due).total_seconds()
        if late_s <= missed_after_s:
            return None
        return (
            f"skipped: scheduled for {due:%Y-%m-%d %H:%M:%S} UTC, starting {late_s:.0f} s late "
            f"(missed_runs: none, missed_after_s: {missed_after_s:g})"
        )
    later = _later_due_run(flow_run, due, now)
    if later is None:
        return None
    assert later.expected_start_time is not None
    return (
        f"skipped: superseded by {later.name!r}, scheduled for "
        f"{later.expected_start_time:%Y-%m-%d %H:%M:%S} UTC, also due (missed_runs: latest)"
    )


def _scheduled(flow_run: FlowRun) -> bool:
    return bool(flow_run.deployment_id and flow_run.auto_scheduled and flow_run.expected_start_time)


def _later_due_run(flow_run: FlowRun, due: datetime, now: datetime) -> FlowRun | None:
    """The deployment's latest scheduled run due after ``due`` and by ``now``, in any state:
    one that already ran still supersedes an earlier one that starts after it."""
    assert flow_run.deployment_id is not None
    with get_client(sync_client=True) as client:
        candidates = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[flow_run.deployment_id])
            ),
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(not_any_=[flow_run.id]),
                expected_start_time=FlowRunFilterExpectedStartTime.model_validate(
                    {"after_": due, "before_": now}  # pydantic turns these into its DateTime
                ),
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )
    later = [
        run for run in candidates
        if run.auto_scheduled and run.expected_start_time and run.expected_start_time > due
    ]  # fmt: skip
    return later[0] if later else None
