"""The flow's run policies on their own: missed schedules, and the crash automation it keeps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from flows.crash_detection import (
    AUTOMATION,
    HEARTBEAT_S,
    HeartbeatMisconfigured,
    check_heartbeat,
    crash_automation,
    ensure_crash_automation,
)
from flows.missed_runs import skip_reason


def scheduled_run(late_s: float, auto_scheduled: bool = True) -> FlowRun:
    """A deployment's run that was due ``late_s`` seconds ago."""
    due = datetime.now(UTC) - timedelta(seconds=late_s)
    return FlowRun.model_validate(  # pydantic turns the time into Prefect's DateTime
        {
            "flow_id": uuid4(),
            "deployment_id": uuid4(),
            "auto_scheduled": auto_scheduled,
            "expected_start_time": due,
        }
    )


def test_under_none_a_run_later_than_allowed_is_skipped_saying_why() -> None:
    reason = skip_reason(scheduled_run(late_s=7200), "none", missed_after_s=3600)
    assert reason is not None and "missed_runs: none" in reason and "7200 s late" in reason
    assert skip_reason(scheduled_run(late_s=60), "none", missed_after_s=3600) is None


@pytest.mark.parametrize("policy", ["all", "none", "latest"])
def test_runs_started_by_hand_or_outside_a_deployment_always_run(policy: str) -> None:
    by_hand = scheduled_run(late_s=7200, auto_scheduled=False)
    assert skip_reason(by_hand, policy, missed_after_s=0) is None  # type: ignore[arg-type]
    assert skip_reason(None, policy, missed_after_s=0) is None  # type: ignore[arg-type]


def test_all_runs_every_missed_run_and_unknown_policies_are_refused() -> None:
    assert skip_reason(scheduled_run(late_s=7200), "all", missed_after_s=0) is None
    with pytest.raises(ValueError, match="missed_runs must be latest, all or none"):
        skip_reason(scheduled_run(late_s=0), "newest", missed_after_s=0)  # type: ignore[arg-type]


def test_a_run_with_rare_heartbeats_is_refused_naming_the_setting() -> None:
    refused = pytest.raises(HeartbeatMisconfigured, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}), refused:
        check_heartbeat()
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
        check_heartbeat()


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_the_crash_automation_is_kept_exactly_once_and_as_graft_defines_it(
    harness: None,
) -> None:
    assert ensure_crash_automation()  # created
    assert not ensure_crash_automation()  # already there, as defined: nothing written
    with get_client(sync_client=True) as client:
        (held,) = client.read_automations_by_name(AUTOMATION)
        edited = crash_automation().model_copy(update={"enabled": False})
        client.update_automation(held.id, edited)  # someone turned it off in the UI
        client.create_automation(crash_automation())  # two runs raced to create it
    assert ensure_crash_automation()
    with get_client(sync_client=True) as client:
        (kept,) = client.read_automations_by_name(AUTOMATION)
    assert kept.enabled
    assert kept.trigger == crash_automation().trigger
