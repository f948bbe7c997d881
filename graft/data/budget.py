"""Running one function over many items in worker processes, each item under a budget.

Decoders are C code: a frame larger than its header says can take gigabytes, and a malformed
file can spin or crash its process. So items run in worker processes (pebble's
``ProcessPool``) whose data segment is capped with ``RLIMIT_DATA`` (an allocation past it
raises ``MemoryError`` inside the worker), and each item runs under a per-item time limit.

Items travel in chunks, since handing over one item costs about as much as checking a small
image. Inside a worker a timer stops an item that overruns its limit at the next point where
Python regains control (Pillow's decoders return to Python between blocks of data). An item
stuck inside one C call cannot be stopped that way: the pool then kills the whole worker once
its chunk has taken ``len(chunk) x timeout_s``, and that chunk's items are run again one per
worker, so the culprit alone is charged. The caller learns, per item, whether it finished, ran
out of time or lost its process.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Generic, TypeVar

from pebble import ProcessExpired, ProcessPool

Item = TypeVar("Item")
Result = TypeVar("Result")
CHUNK = 16  # items per hand-over: amortises pebble's per-task cost (measured: ~0.5 ms a task)
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: keeps workers busy, memory bounded
GRACE_S = 2.0  # on top of a chunk's time limit, for the worker's own bookkeeping


@dataclass(frozen=True)
class Budget:
    """What one item may use: ``memory_mb`` MiB of data segment per worker process and
    ``timeout_s`` seconds of wall time."""

    memory_mb: int
    timeout_s: float


@dataclass(frozen=True)
class Outcome(Generic[Result]):
    """How one item ended: its ``result``; or ``timed_out``; or ``exit_code`` when its worker
    process died (negative: killed by that signal, as multiprocessing reports it)."""

    result: Result | None = None
    timed_out: bool = False
    exit_code: int | None = None


class _Overtime(BaseException):
    """Raised in a worker when an item overruns its time (a BaseException, so that code
    catching every ``Exception`` of a decoder does not swallow it)."""


def _overtime(signum: int, frame: object) -> None:
    raise _Overtime


def _start_worker(
    memory_mb: int,
    started: Synchronized[int],
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> None:
    with started.get_lock():
        started.value += 1
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    signal.signal(signal.SIGALRM, _overtime)
    initializer(*initargs)


def _run_chunk(
    function: Callable[[Item], Result], items: list[Item], timeout_s: float
) -> list[Outcome[Result]]:
    """Run in a worker: ``function`` on each item, each under ``timeout_s`` seconds."""
    outcomes: list[Outcome[Result]] = []
    for item in items:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                result = function(item)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Overtime:
            outcomes.append(Outcome(timed_out=True))
        else:
            outcomes.append(Outcome(result=result))
    return outcomes


def map_budgeted(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    budget: Budget,
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[tuple[int, Outcome[Result]]]:
    """``(index, outcome)`` for every item, as chunks finish (not in order).

    ``function``, ``initializer`` and the items must be picklable (module-level functions):
    workers are started by a fork server, so they hold none of this process's threads or
    locks; as with any multiprocessing, a script calling this needs an
    ``if __name__ == "__main__"`` guard. ``initializer(*initargs)`` runs once in each worker,
    after its memory cap is set. An exception ``function`` raises is re-raised here. Stopping
    early (closing the iterator, an exception, Ctrl-C) stops every worker at once.
    """
    context = multiprocessing.get_context("forkserver")
    started = context.Value("i", 0)  # workers that got as far as their initializer
    pool = ProcessPool(
        max_workers=max(1, workers),
        initializer=_start_worker,
        initargs=(budget.memory_mb, started, initializer, initargs),
        context=context,
    )
    chunks = [list(range(i, min(i + CHUNK, len(items)))) for i in range(0, len(items), CHUNK)]
    queue = iter(chunks)
    pending: dict[Future[list[Outcome[Result]]], list[int]] = {}
    window = max(1, workers) * IN_FLIGHT_PER_WORKER

    def submit(indices: list[int]) -> None:
        limit = len(indices) * budget.timeout_s + GRACE_S
        chunk = [items[i] for i in indices]
        pending[pool.schedule(_run_chunk, (function, chunk, budget.timeout_s), timeout=limit)] = (
            indices
        )

    finished = False
    try:
        while True:
            for indices in queue:
                submit(indices)
                if len(pending) >= window:
                    break
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                indices = pending.pop(future)
                lost = _lost(future)
                if lost is None:
                    yield from zip(indices, future.result(), strict=True)
                elif len(indices) == 1:
                    yield indices[0], lost
                else:  # one item killed its worker: run each again alone to find which
                    for index in indices:
                        submit([index])
        finished = True
    finally:
        if finished:
            if chunks:  # the pool started its workers with the first chunk
                _await_workers(started, max(1, workers))
            pool.close()
        else:
            pool.stop()  # kill the workers now rather than wait for queued items
        pool.join()


def _await_workers(started: Synchronized[int], count: int, timeout_s: float = 30) -> None:
    """Wait until ``count`` workers have started (or ``timeout_s`` passed).

    A worker still starting when the pool closes finds the pool's locks already gone (pebble
    closes its channels before stopping such workers) and dies printing a traceback: seen on
    a loaded machine, where a few items were done before the second worker was up.
    """
    deadline = time.monotonic() + timeout_s
    while started.value < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _lost(future: Future[Any]) -> Outcome[Any] | None:
    """How a chunk's worker was lost (timed out or died), or None when the chunk finished."""
    try:
        future.result()
    except FutureTimeout:
        return Outcome(timed_out=True)
    except ProcessExpired as expired:
        return Outcome(exit_code=expired.exitcode)
    return None
