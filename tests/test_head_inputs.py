"""Phase 1 on cached features computes what the full network computes, for every family."""

from __future__ import annotations

import pytest
import torch

from graft.training.head_inputs import FeatureBatches, cached_views, head_inputs
from graft.training.models import build_model, trainable_head

FAMILIES = ["vgg11", "vgg11_bn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("scope", ["top_module", "last_layer"])
def test_head_on_cached_features_gives_the_full_models_logits(arch: str, scope: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3)
    images = torch.randn(6, 3, 32, 32)
    batches = [(images[:4], torch.tensor([0, 1, 2, 0])), (images[4:], torch.tensor([1, 2]))]
    head = trainable_head(model, scope)  # type: ignore[arg-type]
    features, targets = head_inputs(model, head, batches, torch.device("cpu"))
    assert targets.tolist() == [0, 1, 2, 0, 1, 2]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(head(features), model(images), atol=1e-5)


def test_feature_batches_draw_views_reproducibly_and_cover_every_image() -> None:
    features = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # view v, image i
    targets = torch.arange(5)
    batches = FeatureBatches(features, targets, 2, torch.Generator().manual_seed(1))
    first = [(f.clone(), t.clone()) for f, t in batches]
    again = FeatureBatches(features, targets, 2, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    seen = torch.cat([t for _, t in first])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4] and len(batches) == 3
    for feature, target in first:  # each row is its own image, from view 0 or view 1
        assert all(int(f) % 5 == int(t) for f, t in zip(feature[:, 0], target, strict=True))
    in_order = FeatureBatches(features, targets, 5)
    assert [f[:, 0].tolist() for f, _ in in_order] == [[0, 1, 2, 3, 4]]


def test_views_stack_one_pass_per_view() -> None:
    model = build_model("resnet18", num_classes=2)
    batch = [(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 0]))]
    head = model.get_submodule("fc")
    features, targets = cached_views(model, head, [batch, batch], torch.device("cpu"))
    assert features.shape == (2, 3, 512) and targets.tolist() == [0, 1, 0]
