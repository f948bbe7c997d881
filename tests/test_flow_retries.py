"""The stage task retries while another DVC command holds DVC's lock, and on nothing else."""

from __future__ import annotations

import pytest
from prefect.client.schemas.objects import TaskRun
from prefect.states import Failed

from flows.stages import DvcLocked, StageFailed, retry_if_dvc_locked, run_stage, stage_task


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (DvcLocked("stage 'ingest' failed (exit 1):\nERROR: Unable to acquire lock"), True),
        (StageFailed("stage 'ingest' failed (exit 1):\nevaluation exploded"), False),
        (StageFailed("stage 'ingest' failed (exit -9):\ntimed out after 0.5s"), False),
        (ValueError("no such stage in dvc.yaml: trian"), False),
    ],
)
def test_only_a_dvc_lock_is_retried(error: Exception, retried: bool) -> None:
    task_run = TaskRun(task_key="stage", dynamic_key="0", name="ingest-0")
    assert retry_if_dvc_locked(run_stage, task_run, Failed(data=error)) is retried


def test_each_stage_task_is_named_after_it_and_backs_off_exponentially() -> None:
    ingest = stage_task("ingest", lock_retries=5)
    assert ingest.name == "ingest"
    assert ingest.retries == 5
    assert ingest.retry_delay_seconds == [1, 2, 4, 8, 16]  # seconds before each retry
    assert ingest.retry_condition_fn is retry_if_dvc_locked
    never = stage_task("split", lock_retries=0)
    assert never.retries == 0 and never.retry_condition_fn is retry_if_dvc_locked
