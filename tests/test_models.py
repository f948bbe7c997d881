"""The model factory: heads replaced whatever the family calls them, blocks frozen by policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graft.training.models import (
    backbone_blocks,
    build_model,
    head_module,
    last_linear_name,
    replace_head,
    set_trainable,
)


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("resnet18", "fc"),
        ("vgg11", "classifier.6"),
        ("vgg16", "classifier.6"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "classifier.2"),
    ],
)
def test_head_is_replaced_for_every_family(arch: str, head: str) -> None:
    model = build_model(arch, num_classes=5)
    assert last_linear_name(model) == head
    replace_head(model, 3)
    layer = model.get_submodule(head)
    assert isinstance(layer, nn.Linear) and layer.out_features == 3
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_vgg16_deepest_block_is_features_24_onwards() -> None:
    model = build_model("vgg16", num_classes=2)
    blocks = backbone_blocks(model)
    assert len(blocks) == 5
    features = model.get_submodule("features")
    assert isinstance(features, nn.Sequential)
    deepest = {id(p) for p in blocks[-1].parameters()}
    assert deepest == {id(p) for p in features[24:].parameters()}


def test_freezing_policies() -> None:
    model = build_model("resnet18", num_classes=4)
    assert set_trainable(model, 0) == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}

    unfrozen = set_trainable(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"} | {
        n for n, _ in model.named_parameters() if n.startswith("layer4.")
    }
    assert {id(p) for p in unfrozen} == {id(p) for p in model.get_submodule("layer4").parameters()}

    set_trainable(model, 99)  # more blocks than there are: the whole network
    assert all(p.requires_grad for p in model.parameters())


def test_vgg_head_is_the_whole_classifier() -> None:
    # As in the VGG recipe: features frozen, every classifier layer trained with the new one.
    model = build_model("vgg11", num_classes=2)
    assert head_module(model) is model.get_submodule("classifier")


@pytest.mark.parametrize(
    "arch",
    [
        "vgg11",
        "vgg13_bn",
        "vgg16_bn",
        "vgg19",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "convnext_tiny",
        "regnet_x_400mf",
    ],
)
def test_every_family_splits_into_head_and_blocks_and_freezes_by_policy(arch: str) -> None:
    model = build_model(arch, num_classes=4)
    replace_head(model, 3)
    head = {id(p) for p in head_module(model).parameters()}
    blocks = backbone_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    assert not head & in_blocks  # the head is never part of a backbone block
    trainable = lambda: {id(p) for p in model.parameters() if p.requires_grad}  # noqa: E731

    assert set_trainable(model, 0) == [] and trainable() == head
    deepest = set_trainable(model, 1)
    assert {id(p) for p in deepest} == {id(p) for p in blocks[-1].parameters()}
    assert trainable() == head | {id(p) for p in deepest}
    everything = set_trainable(model, "all")
    assert trainable() == {id(p) for p in model.parameters()}
    assert len(everything) == len(list(model.parameters())) - len(head)
    last = model.get_submodule(last_linear_name(model))
    set_trainable(model, 0, head=last)  # scope last_layer: only the new layer
    assert trainable() == {id(last.weight), id(last.bias)}


def test_unfreeze_blocks_param_accepts_a_count_or_all_and_names_the_key() -> None:
    from graft.config.params import UnfreezePhase

    base = {"epochs": 1, "lr": 1e-5, "head_lr": 1e-4}
    assert UnfreezePhase(blocks="all", **base).blocks == "all"  # type: ignore[arg-type]
    assert UnfreezePhase(blocks=3, **base).blocks == 3  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks"):
        UnfreezePhase(blocks="some", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks"):
        UnfreezePhase(blocks=-1, **base)  # type: ignore[arg-type]
