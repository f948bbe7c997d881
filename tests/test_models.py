"""The model factory: heads replaced whatever the family calls them, blocks frozen by policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.models import (
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
