"""Model factory: any torchvision classifier by name, a new head, and freezing by blocks.

The *head* is the top-level part of the network that holds its last linear layer (VGG's
``classifier``, ResNet's ``fc``, ...); everything else is the *backbone*, seen as an ordered
list of blocks so that "unfreeze the deepest N blocks" means the same thing for every family
(for VGG16 the deepest block is ``features[24:]``).
"""

from __future__ import annotations

from typing import Literal

import torchvision
from torch import nn

from graft.errors import GraftError


class ModelError(GraftError):
    """An architecture or checkpoint that cannot be used as asked."""


def available_architectures() -> list[str]:
    """Every torchvision classification model name (``resnet18``, ``vgg16``, ...), sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def unknown_architecture(arch: str) -> str | None:
    """Why ``arch`` is not a torchvision classification model, suggesting known names that share
    its first three letters (or the first few names); None when it is one."""
    known = available_architectures()
    if arch in known:
        return None
    hint = ", ".join([name for name in known if name.startswith(arch[:3])] or known[:8])
    return f"unknown architecture {arch!r} (torchvision classifiers such as: {hint})"


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier with ``num_classes`` outputs, on the CPU.

    Its initialisation draws from torch's global RNG. Raises ModelError for an unknown ``arch``
    and for a network without a final linear layer (no head to replace).
    """
    problem = unknown_architecture(arch)
    if problem:
        raise ModelError(problem)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    last_linear_name(model)  # fail now, not mid-training, for heads that are not linear
    return model


def last_linear_name(model: nn.Module) -> str:
    """Dotted name of the network's final linear layer (``classifier.6``, ``fc``, ...).

    Raises ModelError when the network has no linear layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no linear output layer to replace")
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the final linear layer, in place, for a freshly initialised one (drawn from torch's
    global RNG, on the CPU) with ``num_classes`` outputs. Raises ModelError without one."""
    name = last_linear_name(model)
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)
    setattr(parent, child_name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def head_module(model: nn.Module) -> nn.Module:
    """The top-level child that holds the final linear layer: trained in every phase.

    Raises ModelError when the network has no linear layer.
    """
    return model.get_submodule(last_linear_name(model).split(".")[0])


HeadScope = Literal["top_module", "last_layer"]


def trainable_head(model: nn.Module, scope: HeadScope) -> nn.Module:
    """What phase 1 trains: the whole top-level head module (``top_module``), or only its new
    last linear layer (``last_layer``). Raises ModelError when the network has no linear layer.
    """
    if scope == "last_layer":
        return model.get_submodule(last_linear_name(model))
    return head_module(model)


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone as ordered blocks, shallowest first.

    Raises ModelError for a family whose backbone cannot be split into blocks.
    """
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        layers = list(features.children())
        if any(isinstance(layer, nn.MaxPool2d) for layer in layers):
            return _cut_after_pools(layers)  # VGG, AlexNet: a block ends at each max-pool
        return layers  # MobileNet, EfficientNet, ConvNeXt, DenseNet, Swin
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNet, ResNeXt, Wide ResNet
        stem = nn.ModuleList([model.get_submodule(n) for n in ("conv1", "bn1")])
        return [stem] + [model.get_submodule(f"layer{i}") for i in range(1, 5)]
    trunk = getattr(model, "trunk_output", None)  # RegNet
    if isinstance(trunk, nn.Sequential):
        return [model.get_submodule("stem"), *trunk.children()]
    raise ModelError(
        f"unfreezing blocks is not supported for {type(model).__name__}; "
        "set finetune.unfreeze.blocks: 0 to train the head only"
    )


def _cut_after_pools(layers: list[nn.Module]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    if current:
        blocks.append(nn.Sequential(*current))
    return blocks


def set_trainable(
    model: nn.Module, unfrozen_blocks: int | Literal["all"], head: nn.Module | None = None
) -> list[nn.Parameter]:
    """Freeze all but ``head`` and the deepest ``unfrozen_blocks``; return the unfrozen params.

    ``head`` defaults to the top-level head module. ``"all"`` (or more blocks than there are)
    unfreezes the whole network. Raises ModelError when blocks are asked for and the network
    cannot be split into them.
    """
    head = head if head is not None else head_module(model)
    for parameter in model.parameters():
        parameter.requires_grad = False
    for parameter in head.parameters():
        parameter.requires_grad = True
    if unfrozen_blocks == 0:
        return []
    head_ids = {id(p) for p in head.parameters()}
    if unfrozen_blocks == "all" or unfrozen_blocks >= len(blocks := backbone_blocks(model)):
        unfrozen = [p for p in model.parameters() if id(p) not in head_ids]
    else:
        unfrozen = [p for block in blocks[-unfrozen_blocks:] for p in block.parameters()]
    for parameter in unfrozen:
        parameter.requires_grad = True
    return unfrozen
