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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from graft.training.device import Pairs
from graft.training.models import ModelError


class _Captured(Exception):
    """Raised by the hook to skip the rest of the forward pass once the head input is kept."""


def head_inputs(
    model: nn.Module, head: nn.Module, batches: Pairs, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors ``head`` receives for every input of ``batches`` (``model`` in eval mode,
    on ``device``): ``(N, ...)`` in the head's input shape and dtype (VGG's classifier:
    ``(N, 25088)``, fewer columns when folded), and the int64 ``(N,)`` targets, on ``device``.

    Raises ModelError when ``model``'s forward never calls ``head``.
    """
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

    ``features`` is ``(views, N, ...)`` and ``targets`` int64 ``(N,)``, on one device; each
    batch holds ``batch_size`` images (the last one fewer). Each epoch draws a new order and, for
    every image, which of its cached augmented views to use, from ``generator`` (so runs are
    reproducible).
    """

    features: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    generator: torch.Generator | None = None  # None: in order, view 0 (validation)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(batch_size, ...)`` head inputs and their ``(batch_size,)`` targets."""
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
        """Batches per epoch."""
        return -(-self.features.shape[1] // self.batch_size)


def cached_views(
    model: nn.Module, head: nn.Module, view_batches: Sequence[Pairs], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs for each pass over the data (one per view, in the same image order), stacked
    as ``(views, N, ...)``, and the first pass's int64 ``(N,)`` targets, on ``device``.

    Raises ModelError as :func:`head_inputs` does.
    """
    passes = [head_inputs(model, head, batches, device) for batches in view_batches]
    return torch.stack([features for features, _ in passes]), passes[0][1]
