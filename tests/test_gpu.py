"""The CUDA-only paths: mixed precision, channels-last, pinned batches, graft predict on CUDA.

Marked ``gpu``: skipped on machines without CUDA (see conftest.py) and run wherever a GPU is
lent, with `pytest -m gpu`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from graft.config.params import Common
from graft.data.loaders import ImageSet, InMemoryImages, make_loader
from graft.inference.model_source import load_model
from graft.inference.predict import PredictOptions, gather_inputs, predict_files
from graft.training.checkpoints import CheckpointMeta, save_checkpoint
from graft.training.device import Speed
from graft.training.loop import fit, measure
from graft.training.models import build_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _batches(count: int, classes: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, size, size, generator=generator)
    targets = torch.randint(classes, (count,), generator=generator)
    return [(images[i : i + 8], targets[i : i + 8]) for i in range(0, count, 8)]


def _common(**changes: object) -> Common:
    settings = dict(seed=0, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, device="cuda")
    return Common.model_validate({**settings, **changes})


def test_mixed_precision_trains_with_a_gradient_scaler() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3).to(CUDA)
    speed = Speed(amp=True)
    assert speed.uses_amp(CUDA) and not speed.uses_amp(torch.device("cpu"))
    with speed.autocast(CUDA):
        assert model(torch.zeros(2, 3, 32, 32, device=CUDA)).dtype == torch.float16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(32, 3)
    outcome = fit(
        model, [{"params": list(model.parameters()), "lr": 1e-3}], batches, batches,
        epochs=2, patience=2, device=CUDA, phase="amp", speed=speed,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in outcome.history)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_channels_last_gives_the_same_predictions() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3).to(CUDA).eval()
    inputs = torch.randn(4, 3, 32, 32)
    plain = measure(model, [(inputs, torch.zeros(4, dtype=torch.int64))], CUDA)
    model.to(memory_format=torch.channels_last)
    speed = Speed(channels_last=True)
    assert speed.inputs(inputs, CUDA).is_contiguous(memory_format=torch.channels_last)
    nhwc = measure(model, [(inputs, torch.zeros(4, dtype=torch.int64))], CUDA, speed)
    assert nhwc[0] == pytest.approx(plain[0], rel=1e-3)


def test_pinned_batches_only_for_cuda() -> None:
    images = ImageSet(
        InMemoryImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)),
        torch.zeros(4, dtype=torch.int64),
        ["a"], ["0" * 64] * 4, ["x.png"] * 4,
    )  # fmt: skip
    inputs, _ = next(iter(make_loader(images, _common(pin_memory=True), batch_size=2)))
    assert inputs.is_pinned()
    on_cpu = make_loader(images, _common(pin_memory=True, device="cpu"), batch_size=2)
    assert not next(iter(on_cpu))[0].is_pinned()


def test_folded_vgg_trains_under_mixed_precision() -> None:
    from graft.training.folding import folded

    torch.manual_seed(0)
    model: nn.Module = build_model("vgg11", 3).to(CUDA)
    batches = _batches(16, 3)
    with folded(model, 32) as applied:
        assert applied
        outcome = fit(
            model, [{"params": list(model.parameters()), "lr": 1e-4}], batches, batches,
            epochs=1, patience=1, device=CUDA, phase="amp", speed=Speed(amp=True),
        )  # fmt: skip
    assert outcome.best is not None
    first = model.get_submodule("classifier.0")
    assert isinstance(first, nn.Linear) and first.in_features == 512 * 7 * 7  # unfolded again


def test_predict_on_cuda_agrees_with_the_cpu(tmp_path: Path) -> None:
    # graft predict's batches on the GPU (uint8 moved, normalised there) against the CPU run.
    torch.manual_seed(0)
    meta = CheckpointMeta("resnet18", ["a", "b", "c"], 32, [0.5] * 3, [0.5] * 3, 0, {}, "x")
    save_checkpoint(tmp_path / "model.pt", build_model("resnet18", 3), meta)
    generator = np.random.default_rng(0)
    for index in range(20):
        pixels = generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{index:02d}.png")
    files = gather_inputs([tmp_path]).files[:-1]  # the images, not model.pt (sorted last)
    model, source = load_model(tmp_path, str(tmp_path / "model.pt"))
    rows = {
        device: list(predict_files(model, source, files, PredictOptions(8, 3, 1, device)))
        for device in ("cpu", "cuda")
    }
    assert [r.verdict for r in rows["cuda"]] == ["accepted"] * 20
    for on_cpu, on_gpu in zip(rows["cpu"], rows["cuda"], strict=True):
        assert [label for label, _ in on_gpu.top] == [label for label, _ in on_cpu.top]
        assert [p for _, p in on_gpu.top] == pytest.approx([p for _, p in on_cpu.top], abs=1e-4)
