"""Folding VGG's pooled classifier input changes the cost of training, not what it computes."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from graft.training.determinism import seeded
from graft.training.folding import (
    FoldedLinear,
    cell_groups,
    fold,
    folded,
    pool_windows,
    track_weight_decay,
    unfold,
)
from graft.training.history import EpochResult
from graft.training.loop import Interrupted, fit
from graft.training.models import ModelError, build_model


def test_cell_groups_follow_the_pool_windows() -> None:
    pool = nn.AdaptiveAvgPool2d(7)
    assert cell_groups(pool_windows(pool, 1, 1)).tolist() == [0] * 49  # one cell, 49 copies
    rows = cell_groups(pool_windows(pool, 2, 2)).reshape(7, 7)
    assert int(rows.max()) + 1 == 9  # per side: cells 0-2 copy input 0, 3 averages, 4-6 copy 1
    assert len(set(rows[0, :3].tolist())) == 1 and rows[0, 3] != rows[0, 2]
    assert int(cell_groups(pool_windows(pool, 4, 4)).max()) + 1 == 49  # nothing to fold


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    """torchvision's VGG11, built once (initialising 133M weights takes seconds); copy it."""
    torch.manual_seed(0)
    return build_model("vgg11", num_classes=3)


@pytest.mark.parametrize(("size", "columns"), [(32, 512), (64, 512 * 9)])
def test_folded_vgg_computes_what_the_full_one_does(
    vgg11: nn.Module, size: int, columns: int
) -> None:
    model = copy.deepcopy(vgg11).eval()
    images = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model(images)
        assert fold(model, size)
        first = model.get_submodule("classifier.0")
        assert isinstance(first, FoldedLinear) and first.weight.shape == (4096, columns)
        assert torch.allclose(model(images), expected, atol=1e-5)
        unfold(model)
        assert type(model.get_submodule("classifier.0")) is nn.Linear
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_nothing_is_folded_where_the_pool_does_not_repeat_cells(vgg11: nn.Module) -> None:
    assert not fold(copy.deepcopy(vgg11), 128)  # a 4x4 map: 49 distinct cells
    for arch, size in (("resnet18", 32), ("alexnet", 64)):
        assert not fold(build_model(arch, num_classes=2), size), arch


def test_a_folded_model_refuses_another_image_size() -> None:
    model = small_vgg(classes=2)
    fold(model, 32)
    with pytest.raises(ModelError, match="image size"):
        model(torch.zeros(1, 3, 64, 64))


def small_vgg(classes: int) -> nn.Module:
    """torchvision's VGG with narrow layers: the same structure, trainable in float64 at once."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (8, 16, 16, 16, 16):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    model = torchvision.models.VGG(nn.Sequential(*layers), num_classes=classes)
    model.classifier = nn.Sequential(
        nn.Linear(channels * 7 * 7, 32), nn.ReLU(), nn.Dropout(),
        nn.Linear(32, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, classes),
    )  # fmt: skip
    return model


@pytest.mark.parametrize("size", [32, 64])
def test_training_folded_then_unfolding_equals_training_the_full_network(size: int) -> None:
    """AdamW with weight decay, dropout on, every layer trained: the same weights either way.

    In float64, so that the comparison is not at the mercy of float32 rounding, which AdamW
    amplifies for weights whose gradient is close to zero.
    """
    torch.manual_seed(0)
    full = small_vgg(classes=3).double()
    small = copy.deepcopy(full)
    start = full.state_dict()["classifier.0.weight"].clone()
    images = torch.randn(6, 3, size, size, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])

    def train(model: nn.Module) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
        track_weight_decay(model, optimizer)
        torch.manual_seed(1)  # the same dropout masks on both sides
        model.train()
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()

    train(full)
    with folded(small, size) as applied:
        assert applied
        train(small)
    trained, expected = small.state_dict(), full.state_dict()
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        assert trained[name].shape == tensor.shape, name
        assert torch.allclose(trained[name], tensor, rtol=1e-9, atol=1e-12), name
    assert (expected["classifier.0.weight"] - start).abs().max() > 1e-3  # it did train


def test_a_resumed_folded_fit_with_weight_decay_ends_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    """Resuming loads the optimizer's saved state, which replaces its parameter groups: the
    folded offsets' weight decay must follow the learning rate the schedule sets in the new
    groups, or the resumed weights drift from the uninterrupted ones."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [(images[:4], torch.tensor([0, 1, 0, 1])), (images[4:], torch.tensor([1, 0, 1, 0]))]

    def run(resume: Path, stop_after: int | None = None) -> dict[str, torch.Tensor]:
        def interrupt(result: EpochResult) -> None:
            if result.epoch == stop_after:
                raise Interrupted

        with seeded(0):
            model = small_vgg(classes=2)
            with folded(model, 32) as applied:
                assert applied
                fit(
                    model, [{"params": list(model.parameters()), "lr": 1e-2}], batches, batches,
                    epochs=4, patience=4, device=torch.device("cpu"), phase="pretrain",
                    weight_decay=0.5, resume=resume, after_epoch=interrupt,
                    on_optimizer=partial(track_weight_decay, model),
                )  # fmt: skip
        return model.state_dict()

    whole = run(tmp_path / "whole.pt")
    state = tmp_path / "interrupted.pt"
    with pytest.raises(Interrupted):
        run(state, stop_after=1)
    resumed = run(state)
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
