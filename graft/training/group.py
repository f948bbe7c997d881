"""The processes that train one model together, and what they must agree on.

A data-parallel stage runs as ``world`` processes (ranks) started by torchrun's engine
(graft.training.launch). Each rank trains on its share of every batch; PyTorch's
DistributedDataParallel sums the gradients, so the weights stay the same on every rank.
Everything else a rank decides from numbers (the epoch's metrics, hence early stopping and the
best epoch; the state it resumes from; the BatchNorm statistics it validates with) must be the
same on every rank too, or the ranks would part ways and wait on each other forever. So those
numbers are summed over the ranks and then taken from rank 0, bit for bit, by the methods here.

One process is a group of one (:data:`LOCAL`): every method is then the identity and touches
no ``torch.distributed`` state, so the one-process path computes exactly what it did before.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place among the ``world`` ranks training one model.

    ``rank`` is global (0 writes every output), ``local_rank`` the index on this machine (the
    CUDA device it uses); ``sync_batchnorm`` converts BatchNorm layers to SyncBatchNorm in
    :meth:`wrap`. A group with ``world`` > 1 needs an initialised default process group.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sync_batchnorm: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes outputs, resume state and the log (rank 0)."""
        return self.rank == 0

    def say(self, message: str) -> None:
        """Print ``message`` to stderr on rank 0 only, so that a log holds each line once."""
        if self.is_writer:
            print(message, file=sys.stderr, flush=True)

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of the group: nothing for one process (so its record
        is what it always was), else the world size and the collective backend."""
        if not self.distributed:
            return {}
        return {"distributed": {"world_size": self.world, "backend": dist.get_backend()}}

    def shard(self, count: int) -> tuple[int, int]:
        """This rank's rows ``[start, stop)`` of a batch of ``count``: contiguous, in rank
        order, sizes differing by at most one (every rank gets one when ``count >= world``)."""
        return self.rank * count // self.world, (self.rank + 1) * count // self.world

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the ranks train it: itself for one process, else wrapped in
        DistributedDataParallel (its BatchNorm layers first made SyncBatchNorm when asked).

        Only parameters that require grad at this moment are synchronised, so freeze before
        wrapping. Its state dict keys gain ``module.``: keep using ``model`` for state.
        """
        if not self.distributed:
            return model
        if self.sync_batchnorm:
            # Replaces the children in place: ``model`` itself then holds the SyncBatchNorm
            # layers, whose parameters and buffers have the names BatchNorm's had.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        cuda = next(model.parameters()).device.type == "cuda"
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.cuda.current_device()] if cuda else None,
            # Gradients live in the buckets that are summed: no copy in or out every step.
            gradient_as_bucket_view=True,
        )

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over the ranks, the same bits on every rank (rank 0's sum is
        broadcast, as a sum's last bits may depend on where it was taken). In place; returned."""
        if self.distributed:
            dist.all_reduce(values)
            dist.broadcast(values, src=0)
        return values

    def from_writer(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``values`` on every rank (same shape everywhere). In place; returned."""
        if self.distributed:
            dist.broadcast(values, src=0)
        return values

    def object_from_writer(self, value: T) -> T:
        """Rank 0's ``value`` (anything picklable: a saved training state) on every rank."""
        if not self.distributed:
            return value
        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def align(self, model: nn.Module, *, buffers_only: bool = False) -> None:
        """Give every rank rank 0's parameters and buffers (only buffers: BatchNorm running
        statistics, which each rank updates from its own share of the last batch)."""
        if not self.distributed:
            return
        tensors = list(model.buffers()) if buffers_only else list(model.state_dict().values())
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def gather_rows(self, local: torch.Tensor, positions: list[torch.Tensor]) -> torch.Tensor:
        """The rows every rank computed, put in their places: ``local`` is this rank's
        ``(n_r, ...)`` rows, ``positions[r]`` the int64 ``(n_r,)`` places of rank r's rows in
        the result (the same list on every rank). Returns ``(sum n_r, ...)`` on every rank,
        on ``local``'s device."""
        if not self.distributed:
            return local
        longest = max(len(p) for p in positions)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: len(local)] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)  # equal shapes: the backends require it
        rows = local.new_empty((sum(len(p) for p in positions), *local.shape[1:]))
        for piece, where in zip(pieces, positions, strict=True):
            rows[where.to(rows.device)] = piece[: len(where)]
        return rows


LOCAL = Group()  # one process: every method is the identity
