"""Checks of validated params against this machine: files, installed packages, devices.

:func:`graft.config.params.parse_params` only checks what the file says; whether its source
folders exist here and hold only what DVC can track, whether this torchvision knows its
architecture, and whether this machine has the devices its data-parallel settings ask for,
depends on where it runs. Each entry point checks what it needs, right after loading the
params and before any work: ingest the sources, the training stages the architecture and the
data-parallel settings, ``graft check`` and the flow all of them. Every check raises
:class:`~graft.config.params.ParamsError` naming every bad key at once, in the same format as
a validation error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graft.config.architecture import arch_problems, check_arch
from graft.config.params import ROLES, Params, ParamsError, describe_problems
from graft.data.sources import class_folders, invisible_collisions, look_alike_message, untrackable
from graft.training.device import resolve_device


def source_problems(params: Params, root: Path = Path(".")) -> list[tuple[str, str]]:
    """``(key, message)`` for every source folder that is missing or not a folder, and for
    every path in one that DVC cannot track or would see differently from graft (see
    :func:`graft.data.sources.untrackable`; the first few of each source, then a count).

    A relative ``ingest.sources.<role>.uri`` is taken relative to ``root``, the folder holding
    params.yaml; an absolute one as it is. Returns an empty list when every folder exists and
    DVC can track all of it.
    """
    problems = []
    for role in ROLES:
        uri = params.ingest.sources.for_role(role).uri
        key = f"ingest.sources.{role}.uri"
        problems += [(key, message) for message in _folder_problems(root / uri, uri)]
    return problems


SHOWN = 10  # problems listed per source before the rest are counted


def _folder_problems(folder: Path, uri: Path) -> list[str]:
    if not folder.is_dir():
        return [f"source folder {str(uri)!r} does not exist or is not a folder"]
    try:
        messages = untrackable(folder)
    except OSError as error:
        return [f"source folder {str(uri)!r} cannot be listed ({error.strerror})"]
    # A renamed tree can hold thousands of bad names; the first few show what to fix.
    if len(messages) <= SHOWN:
        return messages
    return [*messages[:SHOWN], f"and {len(messages) - SHOWN} more paths like these"]


def source_warnings(params: Params, root: Path = Path(".")) -> list[tuple[str, str]]:
    """``(key, message)`` for every group of class folders of one source whose names look the
    same to a person (see :func:`graft.data.sources.invisible_collisions`).

    A warning, not a problem: they are different classes to graft and DVC, which may be meant.
    ``root`` as for :func:`source_problems`; sources that are not folders are left to it.
    """
    warnings = []
    for role in ROLES:
        folder = root / params.ingest.sources.for_role(role).uri
        try:
            groups = invisible_collisions(class_folders(folder))
        except OSError:
            continue  # no folder to warn about: source_problems reports it
        warnings += [(f"ingest.sources.{role}.uri", look_alike_message(g)) for g in groups]
    return warnings


def check_sources(params: Params, root: Path = Path("."), *, origin: str = "params") -> None:
    """Raise ParamsError naming every ``ingest.sources.<role>.uri`` that is not a folder or
    holds a path DVC cannot track (see :func:`source_problems`).

    ``root`` is the folder holding params.yaml (relative source paths are relative to it);
    ``origin`` names the params file in the message.
    """
    _raise_if_any(origin, source_problems(params, root))


def distributed_problems(params: Params, node_rank: int = 0) -> list[tuple[str, str]]:
    """``(key, message)`` for every data-parallel setting this machine cannot honour: more
    processes per node than CUDA devices (or CPU cores), SyncBatchNorm off CUDA, MPS (no
    backend), a global batch smaller than the world size, a ``--node-rank`` outside ``nnodes``.
    Empty for one process."""
    processes = params.common.processes
    problems: list[tuple[str, str]] = []
    if not 0 <= node_rank < processes.nnodes:
        nodes = processes.nnodes
        problems.append(("--node-rank", f"{node_rank} is not among the {nodes} nodes of "
                         f"common.distributed.nnodes (0 to {nodes - 1})"))  # fmt: skip
    if processes.world_size == 1:
        return problems
    world = processes.world_size
    for key, batch_size in (
        ("pretrain.batch_size", params.pretrain.batch_size),
        ("finetune.batch_size", params.finetune.batch_size),
    ):
        if batch_size < world:  # the global batch is shared: each process needs an image
            message = f"{batch_size} images cannot be shared by {world} processes (world size)"
            problems.append((key, message))
    device = resolve_device(params.common.device)
    asked = f"{processes.nproc_per_node} processes per node"
    if device.type == "cuda":
        present = torch.cuda.device_count()
        if processes.nproc_per_node > present:
            message = f"{asked}, one per CUDA device, but this machine has {present}"
            problems.append(("common.distributed.nproc_per_node", message))
    elif device.type == "cpu":
        cores = len(os.sched_getaffinity(0))
        if processes.nproc_per_node > cores:
            message = f"{asked}, but this process may use {cores} CPU cores"
            problems.append(("common.distributed.nproc_per_node", message))
    else:
        message = f"data-parallel training runs on CUDA or the CPU, not {device}"
        problems.append(("common.device", message))
    if processes.sync_batchnorm and device.type != "cuda":
        message = f"SyncBatchNorm needs CUDA devices; this run trains on {device}"
        problems.append(("common.distributed.sync_batchnorm", message))
    return problems


def check_machine(params: Params, root: Path = Path("."), *, origin: str = "params") -> None:
    """Run every check of this module; raise one ParamsError naming every bad key at once.

    ``root`` and ``origin`` as for :func:`check_sources`.
    """
    problems = source_problems(params, root) + arch_problems(params)
    _raise_if_any(origin, problems + distributed_problems(params))


def _raise_if_any(origin: str, problems: list[tuple[str, str]]) -> None:
    if problems:
        raise ParamsError(describe_problems(origin, problems))


__all__ = [
    "check_arch",
    "check_machine",
    "check_sources",
    "distributed_problems",
    "source_problems",
    "source_warnings",
]
