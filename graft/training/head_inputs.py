"""Frozen-backbone features computed once, so phase 1 trains the head without the backbone.

While the backbone is frozen it is a fixed function of the input: running it every epoch (as
the textbook loop does) recomputes the same numbers. Here every image is passed through the
network once per *view* in eval mode, the tensor that arrives at the head is kept, and the head
trains on those tensors. "What arrives at the head" is captured with a forward pre-hook, so it
is the same for every family whatever its ``forward`` does between backbone and head (VGG's
avgpool + flatten, ResNet's avgpool + flatten, ConvNeXt's pooled map, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from graft.training.models import ModelError

Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


class _Captured(Exception):
    """Raised by the hook to skip the rest of the forward pass once the head input is kept."""


def head_inputs(
    model: nn.Module, head: nn.Module, batches: Pairs, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors ``head`` receives for every input of ``batches`` (eval mode), and targets."""
    kept: list[torch.Tensor] = []

    def keep(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        kept.append(args[0].detach())
        raise _Captured

    handle = head.register_forward_pre_hook(keep)
    model.eval()
    targets: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for inputs, batch_targets in batches:
                with contextlib.suppress(_Captured):
                    model(inputs.to(device))
                if len(kept) != len(targets) + 1:
                    raise ModelError(f"{type(model).__name__}'s forward never reached its head")
                targets.append(batch_targets.to(device))
    finally:
        handle.remove()
    return torch.cat(kept), torch.cat(targets)


@dataclass
class FeatureBatches:
    """Re-iterable batches of cached head inputs: one of the ``views`` per image per epoch.

    ``features`` is ``(views, N, ...)``. Each epoch draws a new order and, for every image, which
    of its cached augmented views to use, from ``generator`` (so runs are reproducible).
    """

    features: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    generator: torch.Generator | None = None  # None: in order, view 0 (validation)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        views, count = self.features.shape[:2]
        if self.generator is None:
            order = torch.arange(count)
            view = torch.zeros(count, dtype=torch.int64)
        else:
            order = torch.randperm(count, generator=self.generator)
            view = torch.randint(views, (count,), generator=self.generator)
        device = self.features.device
        for start in range(0, count, self.batch_size):
            chosen = order[start : start + self.batch_size]
            picked = (view[chosen].to(device), chosen.to(device))
            yield self.features[picked], self.targets[chosen.to(device)]

    def __len__(self) -> int:
        return -(-self.features.shape[1] // self.batch_size)


def cached_views(
    model: nn.Module, head: nn.Module, view_batches: Sequence[Pairs], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs for each pass over the data, stacked as ``(views, N, ...)``, and targets."""
    passes = [head_inputs(model, head, batches, device) for batches in view_batches]
    return torch.stack([features for features, _ in passes]), passes[0][1]
