"""How a training stage starts: in this process, or as torchrun's data-parallel ranks.

``python -m tasks.<stage>`` (what dvc.yaml runs) calls :func:`run_stage`. With
``common.distributed`` left out, or one process in all, the stage runs here as it always did.
With more, this process checks the settings against the machine, then becomes torchrun's
elastic agent for this node (``torch.distributed.launcher``, the engine behind the
``torchrun`` command): it meets the other nodes at ``run.distributed.master_addr:master_port``
(static rendezvous), starts ``nproc_per_node`` processes running ``python -m tasks.<stage>``
again, and waits for them. Those find torchrun's variables (``RANK``, ``WORLD_SIZE``, ...),
join the process group (NCCL on CUDA, gloo on the CPU) and train as ranks of a
:class:`~graft.training.group.Group`; rank 0 writes the outputs.

So ``dvc repro``, ``graft run`` and the deployments start a data-parallel stage like any other.
Machines after the first start their share by hand: ``python -m tasks.<stage> --node-rank N``.
A rank that fails fails the stage: torchrun stops the others, and the error names the rank
and gives its message; a collective that waits longer than
``run.distributed.collective_timeout_s`` raises on its rank rather than hanging.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from graft import atomic
from graft.config.architecture import arch_problems
from graft.config.checks import distributed_problems
from graft.config.params import Params, ParamsError, describe_problems, load_params
from graft.errors import GraftError, run_main
from graft.training.device import resolve_device
from graft.training.group import LOCAL, Group

StageMain = Callable[[Group], None]  # a stage's work, for one process or one rank
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun for every rank
# Seconds the agent gives the other ranks to exit after one failed, before SIGKILL: a rank
# stuck in a collective (or stopped) never exits on SIGTERM, and 30 s (torch's) is long to wait.
SHUTDOWN_S = 10


def run_stage(stage: str, main: StageMain, argv: list[str] | None = None) -> None:
    """Run training stage ``stage`` (``tasks.<stage>``) whose work is ``main``: here, as one
    rank of a running torchrun job, or by launching this node's ranks.

    ``argv`` (default: the command line's) may hold ``--node-rank N`` for nodes after the
    first. Exits with status 1 and one ``error:`` line for a bad setting or a failed rank.
    """
    if all(name in os.environ for name in RANK_VARIABLES):
        _run_rank(main)
    else:
        run_main(lambda: _launch_or_run(stage, main, argv))


def _launch_or_run(stage: str, main: StageMain, argv: list[str] | None) -> None:
    node_rank = _node_rank(stage, argv)
    params = load_params()
    problems = distributed_problems(params, node_rank) + arch_problems(params)
    if problems:  # before any process starts, as every stage's own checks are
        raise ParamsError(describe_problems("params", problems))
    if params.common.processes.world_size == 1:
        main(LOCAL)
        return
    _launch(stage, params, node_rank)


def _node_rank(stage: str, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}",
        description=f"Run the {stage} stage (dvc repro runs it; with common.distributed it "
        "starts torchrun's processes for this node).",
    )
    parser.add_argument(
        "--node-rank", type=int, default=0,
        help="this machine's place among common.distributed.nnodes machines (default 0: the "
        "one that writes the outputs); start the others with 1, 2, ...",
    )  # fmt: skip
    return int(parser.parse_args(argv).node_rank)


def _launch(stage: str, params: Params, node_rank: int) -> None:
    # Imported here: the agent's machinery is needed on this path only.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    processes, meeting = params.common.processes, params.run.distributed
    # One process per core on the CPU would otherwise each start a thread per core.
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes.nproc_per_node)))
    config = LaunchConfig(
        min_nodes=processes.nnodes,
        max_nodes=processes.nnodes,
        nproc_per_node=processes.nproc_per_node,
        run_id=f"graft-{stage}",  # the same on every node: the static rendezvous matches it
        rdzv_backend="static",
        rdzv_endpoint=f"{meeting.master_addr}:{meeting.master_port}",
        rdzv_configs={"rank": node_rank, "timeout": max(1, round(meeting.rendezvous_timeout_s))},
        max_restarts=0,  # a failed rank fails the stage; resume is graft's, from the last epoch
        shutdown_timeout=SHUTDOWN_S,
    )
    print(
        f"{stage}: node {node_rank} of {processes.nnodes} starting {processes.nproc_per_node} "
        f"processes (world size {processes.world_size}), meeting at "
        f"{meeting.master_addr}:{meeting.master_port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", f"tasks.{stage}")
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        message = failure.message
        if isinstance(message, dict):  # torch's own record: {"message": ..., "extraInfo": ...}
            message = message.get("message", message)
        if "timed out" in str(message).lower():  # gloo's and NCCL's words for it
            message = (
                f"{message} (it waited longer than run.distributed.collective_timeout_s = "
                f"{meeting.collective_timeout_s:g} for the others: one may be stuck or gone)"
            )
        raise GraftError(
            f"{stage} failed on rank {rank} of {processes.world_size} (exit code "
            f"{failure.exitcode}): {message}"
        ) from None
    except SignalException as stopped:
        # The agent has stopped its processes; leave with the status the signal means.
        print(f"{stage}: stopped by {stopped.sigval.name}", file=sys.stderr)
        raise SystemExit(128 + stopped.sigval) from None
    except (RuntimeError, OSError) as error:  # the rendezvous: a timeout, a port in use
        raise GraftError(
            f"{stage}: the {processes.nnodes} nodes did not start together: {error} (check "
            f"run.distributed.master_addr:master_port = {meeting.master_addr}:"
            f"{meeting.master_port} and run.distributed.rendezvous_timeout_s = "
            f"{meeting.rendezvous_timeout_s:g})"
        ) from None


def _run_rank(main: StageMain) -> None:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    try:
        params = load_params()
        processes = params.common.processes
        if processes.world_size != world:
            raise ParamsError(
                f"torchrun started {world} processes but common.distributed asks for "
                f"{processes.nproc_per_node} x {processes.nnodes} = {processes.world_size}"
            )
        group = Group(rank, world, int(os.environ["LOCAL_RANK"]), processes.sync_batchnorm)
        device = resolve_device(params.common.device)
        if device.type == "cuda":
            torch.cuda.set_device(group.local_rank)  # "cuda" below means this rank's device
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=params.run.distributed.collective_timeout_s),
        )
        try:
            main(group)
        finally:
            dist.destroy_process_group()
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the agent reports the stop
        sys.exit(128 + signal.SIGINT)
    except Exception as error:  # every failure of a rank: reported with its rank, then exit 1
        _report_rank_failure(rank, error)
        sys.exit(1)


def _report_rank_failure(rank: int, error: Exception) -> None:
    expected = isinstance(error, GraftError)
    message = str(error) if expected else f"{type(error).__name__}: {error}"
    if not expected:
        traceback.print_exc()
    print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    # torchrun's error file (its documented format): the agent reads it into the failure it
    # reports, so the stage's one error line carries this message.
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record: dict[str, Any] = {"message": message, "timestamp": int(time.time())}
        atomic.write_text(Path(error_file), json.dumps(record))
