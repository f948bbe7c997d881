"""Worker processes under a budget: an item that overruns, hangs in C, crashes its process or
asks for too much memory is charged alone, and every other item still gets its result."""

from __future__ import annotations

import os
import signal
import time

import pytest

from graft.data.budget import CHUNK, Budget, Outcome, map_budgeted


def _nothing() -> None:
    pass


def _work(item: str) -> str:
    """What each test item does, by name: a fast result, or one way of misbehaving."""
    if item == "slow":  # returns to Python often: the worker's own timer stops it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pass
    elif item == "stuck":  # deaf to the timer, as a C call that never returns
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    elif item == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif item == "greedy":
        bytearray(512 * 1024 * 1024)  # over the 256 MiB cap: MemoryError in the worker
    elif item == "raises":
        raise ValueError("a bug, not a bad file")
    return item.upper()


def run(items: list[str], timeout_s: float = 0.5) -> dict[int, Outcome[str]]:
    outcomes = map_budgeted(
        _work, items, Budget(memory_mb=256, timeout_s=timeout_s), workers=2, initializer=_nothing
    )
    return dict(outcomes)


def test_every_item_gets_its_outcome_and_misbehaviour_is_charged_alone() -> None:
    items = ["a", "slow", "b", "stuck", "c", "crash", "d"] + [f"x{i}" for i in range(2 * CHUNK)]
    started = time.monotonic()
    found = run(items)
    assert sorted(found) == list(range(len(items)))
    assert found[1] == Outcome(timed_out=True)  # slow
    assert found[3] == Outcome(timed_out=True)  # stuck: the chunk's limit, then alone
    assert found[5] == Outcome(exit_code=-signal.SIGSEGV)  # crash
    fine = [i for i, item in enumerate(items) if item not in ("slow", "stuck", "crash")]
    assert all(found[i] == Outcome(result=items[i].upper()) for i in fine)
    # The stuck item costs its chunk's limit once and its own limit once, not 30 s.
    assert time.monotonic() - started < 25


def test_the_memory_cap_is_a_memory_error_in_the_worker() -> None:
    with pytest.raises(MemoryError):  # the caller (verify) turns it into a verdict
        run(["greedy"])


def test_a_bug_in_the_function_is_raised_not_hidden() -> None:
    with pytest.raises(ValueError, match="a bug, not a bad file"):
        run(["a", "raises"])
