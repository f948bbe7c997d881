"""A failed stage says why in one line; DVC's terminal advice stays out of the run's log."""

from __future__ import annotations

import logging

import pytest

from flows.failures import (
    exit_note,
    failure_reason,
    placed_failure,
    quiet_expected_failures,
    stage_failure,
)
from flows.stages import StageFailed, _DvcHints

DVC_FAILED = (
    "ERROR: failed to reproduce 'register': failed to run: python -m tasks.register, exited with 1"
)


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (  # graft's own error, with its indented details: a failed gate
            [
                "Running stage 'register':",
                "> python -m tasks.register",
                "error: model not registered, gate failed:",
                "  accuracy 0.9601 < register.min_accuracy 0.99",
                "  class 5 recall 0.91 < register.min_class_recall 0.95",
                DVC_FAILED,
            ],
            "model not registered, gate failed: accuracy 0.9601 < register.min_accuracy 0.99; "
            "class 5 recall 0.91 < register.min_class_recall 0.95",
        ),
        (  # a crash: the traceback's last line
            [
                "Traceback (most recent call last):",
                '  File "tasks/evaluate.py", line 3, in <module>',
                "    main()",
                "ZeroDivisionError: division by zero",
                DVC_FAILED,
            ],
            "ZeroDivisionError: division by zero",
        ),
        (
            ["epoch 3: loss 0.2", "baseline broke here", DVC_FAILED],
            "its last output: baseline broke here",
        ),
        (
            ["epoch 3", "timed out after 0.5s: stopped with its whole process tree"],
            "timed out after 0.5s: stopped with its whole process tree",
        ),
        (
            ["ERROR: Unable to acquire lock. Most likely another DVC process is running"],
            "Unable to acquire lock. Most likely another DVC process is running",
        ),
        (["Running stage 'split':", DVC_FAILED], DVC_FAILED.removeprefix("ERROR: ")),
        (["something odd"], "something odd"),
        ([], ""),
    ],
)
def test_the_reason_is_the_most_specific_line(tail: list[str], reason: str) -> None:
    assert failure_reason(tail) == reason


def test_the_exit_code_is_the_stage_commands_when_dvc_reports_it() -> None:
    assert exit_note(255, [DVC_FAILED]) == "its command exited with 1"
    assert exit_note(-9, ["epoch 1"]) == "`dvc repro` exited with -9"
    assert stage_failure("register", 255, ["error: no classes", DVC_FAILED]) == (
        "stage 'register' failed: no classes (its command exited with 1)"
    )


def test_a_placed_failure_names_the_pool_and_the_stages_own_reason() -> None:
    message = (
        "Flow run encountered an exception: StageFailed: stage 'baseline' failed: its last "
        "output: baseline broke here (its command exited with 1)"
    )
    assert placed_failure("baseline", "gpu", "Failed", message) == (
        "stage 'baseline' failed on work pool 'gpu': its last output: baseline broke here "
        "(its command exited with 1)"
    )
    crashed = placed_failure("pretrain", "gpu", "Crashed", "Flow run infrastructure exited -9")
    assert (
        crashed
        == "stage 'pretrain' failed on work pool 'gpu' (Crashed): Flow run infrastructure exited -9"
    )


def test_expected_failures_are_logged_without_traceback(
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    logger = logging.getLogger("prefect.flow_runs")
    before = list(logger.filters)
    quiet_expected_failures(StageFailed)
    quiet_expected_failures(StageFailed)  # idempotent: one filter
    (added,) = [f for f in logger.filters if f not in before]
    request.addfinalizer(lambda: logger.removeFilter(added))
    with caplog.at_level(logging.ERROR, logger="prefect.flow_runs"):
        for error in (StageFailed("stage 'x' failed: why"), KeyError("a bug")):
            try:
                raise error
            except Exception:
                logger.error("Encountered exception during execution", exc_info=True)
    expected, bug = caplog.records
    assert "Traceback" not in caplog.handler.format(expected)
    assert "Traceback" in caplog.handler.format(bug)  # anything else keeps its traceback


def test_dvc_advice_for_a_terminal_is_left_out() -> None:
    output = [
        "Running stage 'register':\n",
        "> python -m tasks.register\n",
        "registered digits-5-9\n",
        "Updating lock file 'dvc.lock'\n",
        "\n",
        "To track the changes with git, run:\n",
        "\n",
        "\tgit add dvc.lock\n",
        "\n",
        "To enable auto staging, run:\n",
        "\n",
        "\tdvc config core.autostage true\n",
        "Use `dvc push` to send your updates to remote storage.\n",
    ]
    hints = _DvcHints()
    kept = [line for line in output if not hints.is_hint(line)]
    assert kept == output[:5]
