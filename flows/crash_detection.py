"""Crashed runs release their slot without a person: Prefect's heartbeats and an automation.

A run whose process dies with the machine (or with SIGKILL) can tell nobody: the server keeps
it ``Running`` and its deployment's one-at-a-time slot taken. Prefect's own engine is the
remedy: every graft flow-run process sends a heartbeat event every :data:`HEARTBEAT_S`
seconds, and one automation on the server marks a graft run Crashed once it has sent no
heartbeat and reached no final state for :data:`SILENCE_S` seconds. Leaving ``Running``
releases the run's deployment concurrency slot (Prefect's orchestration does that for every
such transition), so the next run of the deployment starts at its next slot check.

Worst case from the crash to the next run starting, with Prefect's default server settings:
``SILENCE_S`` (the last heartbeat came at most that long before the automation fires) + 5 s
(the server evaluates such automations every 5 s) + 30 s (a run waiting for the slot asks again
this often: ``PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS``) + 10 s (a worker polls
this often) = 115 s.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.settings import get_current_settings

FLOW_NAME = "graft-pipeline"
AUTOMATION = "graft: crash runs that stopped sending heartbeats"
# Prefect's minimum heartbeat interval: the shorter, the sooner a dead run is noticed.
HEARTBEAT_S = 30
# More than two intervals: one late heartbeat (a busy machine) never crashes a live run.
SILENCE_S = 70
# Environment for every process that runs graft flows (prefect.yaml's workers, `graft serve`).
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}


class HeartbeatMisconfigured(RuntimeError):
    """This flow-run process sends heartbeats too rarely, or none, for crash detection."""


def crash_automation() -> AutomationCore:
    """The automation that marks a silent graft run Crashed, as the server should hold it.

    Proactive: after a graft flow run's heartbeat, it expects another heartbeat or a final
    state (Completed, Failed, Cancelled, Crashed) of the same run within :data:`SILENCE_S`
    seconds; when none comes, it changes that run's state to Crashed. Only runs of graft's
    deployments are watched: other flows' runs may send heartbeats on another interval, and
    a `graft run` holds no slot. Raises nothing.
    """
    return AutomationCore(
        name=AUTOMATION,
        description=(
            f"graft flow runs send a heartbeat every {HEARTBEAT_S} s; one silent for "
            f"{SILENCE_S} s without finishing died with its process or machine. Crashing it "
            "releases its deployment's concurrency slot. Kept in sync by graft."
        ),
        enabled=True,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
                {"prefect.resource.role": "deployment"},  # a deployment's run: it holds a slot
            ],
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=SILENCE_S),
        ),
        actions=[
            ChangeFlowRunState(
                name="Crashed",
                state=StateType.CRASHED,
                force=False,  # a run that has meanwhile finished keeps its final state
                message=f"no heartbeat for {SILENCE_S} s: the run's process or machine died",
            )
        ],
    )


def check_heartbeat() -> None:
    """Refuse to run a graft flow whose process would look dead to the crash automation.

    Reads this process's Prefect setting ``flows.heartbeat_frequency`` (environment variable
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY). Returns when it is at most :data:`HEARTBEAT_S` seconds.
    Raises HeartbeatMisconfigured naming the setting when heartbeats are off or rarer: the
    automation would crash the live run after :data:`SILENCE_S` seconds of silence.
    """
    every = get_current_settings().flows.heartbeat_frequency
    if every is None or every > HEARTBEAT_S:
        raise HeartbeatMisconfigured(
            f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY is {every}: graft flow runs must send a "
            f"heartbeat every {HEARTBEAT_S} s, or a live run would be marked Crashed after "
            f"{SILENCE_S} s. prefect.yaml sets it for its workers and `graft serve`/`graft run` "
            "for their runs; set it in the environment of any other process that runs the flow"
        )


def ensure_crash_automation() -> bool:
    """Make the server at PREFECT_API_URL hold :func:`crash_automation`, exactly once.

    Creates it when missing and rewrites it when it differs (a newer graft, or an edit in the
    UI); extra copies of the same name are deleted. Returns True when anything was written.
    Raises Prefect's and httpx's errors when the server cannot be reached or refuses.
    """
    wanted = crash_automation()
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION)
        for extra in found[1:]:  # two runs that raced to create it: keep one
            client.delete_automation(extra.id)
        if not found:
            client.create_automation(wanted)
            return True
        held = found[0]
        if AutomationCore.model_validate(held.model_dump()) == wanted:
            return bool(found[1:])
        client.update_automation(held.id, wanted)
        return True
