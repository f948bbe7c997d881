"""Running one function over many items in worker processes, each item under a budget.

Decoders are C code that a Python thread cannot interrupt: a frame larger than its header
says can take gigabytes and a malformed file can spin or crash its process. So each item runs
in a worker process (pebble's ``ProcessPool``) whose data segment is capped with
``RLIMIT_DATA`` (an allocation past it raises ``MemoryError`` inside the worker), and the pool
stops a worker that spends longer than the time limit on one item, then starts another. The
caller learns, per item, whether it finished, ran out of time or lost its process.
"""

from __future__ import annotations

import multiprocessing
import resource
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pebble import ProcessExpired, ProcessPool

Item = TypeVar("Item")
Result = TypeVar("Result")
IN_FLIGHT_PER_WORKER = 32  # items queued per worker: keeps workers busy, memory bounded


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


def _start_worker(
    memory_mb: int, initializer: Callable[..., None], initargs: tuple[Any, ...]
) -> None:
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    initializer(*initargs)


def map_budgeted(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    budget: Budget,
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[tuple[int, Outcome[Result]]]:
    """``(index, outcome)`` for every item, in the order they finish.

    ``function``, ``initializer`` and the items must be picklable (module-level functions):
    workers are started by a fork server, so they hold none of this process's threads or
    locks. ``initializer(*initargs)`` runs once in each worker, after its memory cap is set.
    An exception ``function`` raises is re-raised here. Stopping early (closing the iterator,
    an exception, Ctrl-C) stops every worker at once.
    """
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPool(
        max_workers=max(1, workers),
        initializer=_start_worker,
        initargs=(budget.memory_mb, initializer, initargs),
        context=context,
    )
    pending: dict[Future[Result], int] = {}
    queue = iter(enumerate(items))
    window = max(1, workers) * IN_FLIGHT_PER_WORKER
    finished = False
    try:
        while True:
            for index, item in queue:
                pending[pool.schedule(function, (item,), timeout=budget.timeout_s)] = index
                if len(pending) >= window:
                    break
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), _outcome(future)
        finished = True
    finally:
        if finished:
            pool.close()
        else:
            pool.stop()  # kill the workers now rather than wait for queued items
        pool.join()


def _outcome(future: Future[Result]) -> Outcome[Result]:
    try:
        return Outcome(result=future.result())
    except FutureTimeout:
        return Outcome(timed_out=True)
    except ProcessExpired as expired:
        return Outcome(exit_code=expired.exitcode)
