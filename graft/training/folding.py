"""Exact folding of VGG's pooled classifier input at small image sizes.

VGG pools its last feature map to 7x7 (``avgpool``) and flattens it into the first classifier
layer, ``Linear(512*7*7, 4096)``: 102M of its 138M weights. Below 224 px the map is smaller
than 7x7 and the pool only repeats it: at 32-63 px the map is 1x1 and the 49 cells are copies
of each other; at 64-95 px there are 9 distinct cells. The weights that read cells which are
copies for every input always receive the same gradient, so training moves them in lockstep.

Folding trains one weight per distinct cell instead, their group mean, with the gradient
divided by the group size, so AdamW makes exactly the update it would make for each copy;
weight decay is tracked as a scalar. Unfolding writes the full layer back: what full training
would have produced, up to float rounding, in torchvision's own layout. At 32 px the first
layer shrinks 49x, which makes a training step of VGG16's classifier about 5x cheaper (0.51 s
to 0.11 s for a batch of 32 on a 2-core CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torchvision
from torch import nn

from graft.training.models import ModelError


def pool_windows(pool: nn.AdaptiveAvgPool2d, height: int, width: int) -> torch.Tensor:
    """``pool`` as a matrix on a ``height`` x ``width`` map: float32 ``(cells, height*width)``,
    row c holding output cell c's weights over the input positions (its averaging window)."""
    # Pool a one-hot map per input position: each output cell's column is its window.
    basis = torch.eye(height * width).reshape(1, height * width, height, width)
    return pool(basis).flatten(2)[0].T.contiguous()  # (cells, positions)


def cell_groups(windows: torch.Tensor) -> torch.Tensor:
    """For each output cell (row of ``windows``, see :func:`pool_windows`), the index of its
    group of identical cells (same window), the groups numbered by first appearance: int64
    ``(cells,)``."""
    _, inverse = torch.unique(windows, dim=0, return_inverse=True)
    # Renumber by first appearance so the numbering does not depend on unique's sort order.
    first_seen: dict[int, int] = {}
    return torch.tensor([first_seen.setdefault(int(g), len(first_seen)) for g in inverse])


class FoldedPool(nn.Module):
    """The pool computed for one representative cell per group, scaled by the group's size.

    Built from the original ``pool``, the feature map's ``(height, width)``, its windows and
    cell groups. Maps ``(N, C, height, width)`` to ``(N, C, groups)``, which VGG's forward
    flattens as it would the 7x7 map. It is a matrix product with the representatives'
    windows, which is also deterministic on CUDA (the adaptive pool's backward is not).
    """

    mixing: torch.Tensor

    def __init__(
        self,
        pool: nn.AdaptiveAvgPool2d,
        map_size: tuple[int, int],
        windows: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        super().__init__()
        self.pool = pool  # kept to restore on unfold
        self.map_size = map_size
        count = int(groups.max()) + 1
        representatives = [int((groups == g).nonzero()[0]) for g in range(count)]
        sizes = torch.bincount(groups, minlength=count).float()
        # Summing a group's copies: the full layer's weights on a group's cells, summed, times
        # the cell equals the group's mean weight times (size x cell), what the folded layer
        # computes.
        self.register_buffer("mixing", windows[representatives] * sizes[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled ``(N, C, groups)`` of a ``(N, C, height, width)`` feature map.

        Raises ModelError for a map of another size than the one folding was done for.
        """
        if tuple(x.shape[-2:]) != self.map_size:
            raise ModelError(
                f"the classifier was folded for a {self.map_size} feature map, got "
                f"{tuple(x.shape[-2:])}: inputs must keep the image size training started with"
            )
        return torch.matmul(x.flatten(2), self.mixing.T)


class FoldedLinear(nn.Module):
    """The first classifier layer with one weight column per distinct (channel, cell group).

    Built from the full ``linear`` layer, the cell ``groups`` (see :func:`cell_groups`) and
    the feature map's ``channels``. ``weight`` is ``(out, channels x groups)``, the group mean
    of the full layer's columns. Each full column is its group's mean plus a fixed offset from
    it (``residual``, kept off the device and out of the state dict) that AdamW's decoupled
    weight decay shrinks by ``residual_scale``.
    """

    residual_scale: torch.Tensor
    column_sizes: torch.Tensor

    def __init__(self, linear: nn.Linear, groups: torch.Tensor, channels: int) -> None:
        super().__init__()
        count = int(groups.max()) + 1
        full = linear.weight.detach().cpu().reshape(linear.out_features, channels, len(groups))
        sizes = torch.bincount(groups, minlength=count).to(full.dtype)
        summed = torch.zeros(linear.out_features, channels, count, dtype=full.dtype)
        summed.index_add_(2, groups, full)
        mean = summed / sizes
        self.groups, self.channels = groups, channels
        self.residual = full - mean[:, :, groups]  # (out, channels, cells); decays, never trains
        self.weight = nn.Parameter(mean.reshape(linear.out_features, -1).to(linear.weight))
        self.bias = linear.bias
        # In the state dict, so the best epoch and a resumed run restore it with the weights.
        self.register_buffer("residual_scale", torch.ones((), dtype=linear.weight.dtype))
        column_sizes = sizes.repeat(channels).to(linear.weight)
        self.register_buffer("column_sizes", column_sizes, persistent=False)
        # Each folded column stands for ``size`` identical full columns: its raw gradient is
        # their sum. Dividing by the size gives each copy's own gradient, so AdamW's update of
        # the mean is exactly the update of every copy.
        self.weight.register_hook(lambda gradient: gradient / self.column_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, out)`` outputs of the flattened pooled ``(N, channels x groups)`` inputs."""
        return nn.functional.linear(x, self.weight, self.bias)

    def decay(self, factor: float) -> None:
        """Apply one step of decoupled weight decay, ``factor`` = 1 - lr x weight_decay."""
        self.residual_scale.mul_(factor)

    def unfolded(self) -> nn.Linear:
        """The full ``Linear(channels x cells, out)``: every column is its group's mean plus its
        decayed offset, on the folded weight's device and dtype, sharing its bias."""
        out_features = self.weight.shape[0]
        mean = self.weight.detach().cpu().reshape(out_features, self.channels, -1)
        full = mean[:, :, self.groups] + float(self.residual_scale) * self.residual
        layer = nn.Linear(full.shape[1] * full.shape[2], out_features, bias=False)
        layer.weight = nn.Parameter(
            full.reshape(out_features, -1).to(self.weight),
            requires_grad=self.weight.requires_grad,
        )
        layer.bias = self.bias  # never folded: the same parameter throughout
        return layer


def _feature_map_size(model: torchvision.models.VGG, image_size: int) -> tuple[int, int]:
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = parameter.new_zeros(1, 3, image_size, image_size)
        height, width = model.features(probe).shape[-2:]
    model.train(was_training)
    return int(height), int(width)


def fold(model: nn.Module, image_size: int) -> bool:
    """Fold ``model``'s pooled classifier input in place when that saves weights.

    Only torchvision's VGG (whose first classifier layer reads the pooled map directly, with
    no dropout between) is folded, and only when its feature map at ``image_size`` (pixels)
    makes the pool repeat cells. Runs one probe image through the features (no RNG drawn).
    Returns whether it folded.
    """
    if not isinstance(model, torchvision.models.VGG):
        return False
    pool, first = model.avgpool, model.classifier[0]
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or type(first) is not nn.Linear:
        return False
    height, width = _feature_map_size(model, image_size)
    windows = pool_windows(pool, height, width)
    groups = cell_groups(windows)
    distinct = int(groups.max()) + 1
    if distinct == len(groups):
        return False
    channels = first.in_features // len(groups)
    model.avgpool = FoldedPool(pool, (height, width), windows, groups).to(first.weight)
    model.classifier[0] = FoldedLinear(first, groups, channels)
    return True


def unfold(model: nn.Module) -> None:
    """Undo :func:`fold` in place (a no-op on a model that is not folded)."""
    pool = getattr(model, "avgpool", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(pool, FoldedPool) or not isinstance(classifier, nn.Sequential):
        return
    layer = classifier[0]
    assert isinstance(layer, FoldedLinear)
    model.avgpool = pool.pool
    classifier[0] = layer.unfolded()


@contextmanager
def folded(model: nn.Module, image_size: int) -> Iterator[bool]:
    """Train inside the block with ``model`` folded for ``image_size`` (when it applies, see
    :func:`fold`); yields whether it folded, and unfolds on the way out, also on errors."""
    applied = fold(model, image_size)
    try:
        yield applied
    finally:
        if applied:
            unfold(model)


def track_weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s decoupled weight decay reach ``model``'s folded layers' fixed
    offsets: after every step, each folded layer the optimizer trains decays them by
    1 - lr x weight_decay of its group. A no-op when nothing in ``model`` is folded.

    Pass it to :func:`graft.training.loop.fit` as ``on_optimizer`` (bound to the model).
    """
    folded_layers = {
        id(module.weight): module for module in model.modules() if isinstance(module, FoldedLinear)
    }
    owners = [
        (index, folded_layers[id(parameter)])
        for index, group in enumerate(optimizer.param_groups)
        for parameter in group["params"]
        if id(parameter) in folded_layers
    ]
    if not owners:
        return

    def after_step(stepped: torch.optim.Optimizer, *_: Any) -> None:
        # Groups are looked up at every step: loading a resumed optimizer state replaces the
        # group dicts, and the schedule then sets the learning rate in the new ones.
        for index, layer in owners:
            group = stepped.param_groups[index]
            if group["weight_decay"]:
                layer.decay(1 - group["lr"] * group["weight_decay"])

    optimizer.register_step_post_hook(after_step)
