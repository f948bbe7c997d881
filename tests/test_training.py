"""Training on real (tiny) data: deterministic on the CPU, and the frozen backbone stays frozen."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from graft.config.params import Params
from graft.training.finetune import finetune
from graft.training.pretrain import pretrain


def test_pretraining_is_deterministic_on_cpu(prepared: tuple[Params, pd.DataFrame, Path]) -> None:
    params, splits, dataset = prepared
    first = pretrain(splits, dataset, params.pretrain, params.common)
    second = pretrain(splits, dataset, params.pretrain, params.common)
    assert first.outcome.history == second.outcome.history  # every loss, to the last digit
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_finetune_freezes_the_backbone_in_the_head_phase(
    prepared: tuple[Params, pd.DataFrame, Path], tmp_path: Path
) -> None:
    from graft.training.checkpoints import save_checkpoint

    params, splits, dataset = prepared
    backbone = pretrain(splits, dataset, params.pretrain, params.common)
    checkpoint = tmp_path / "pretrained.pt"
    save_checkpoint(checkpoint, backbone.model, backbone.meta)
    head_only = params.finetune.model_copy(
        update={"unfreeze": params.finetune.unfreeze.model_copy(update={"epochs": 0})}
    )
    tuned = finetune(
        splits, dataset, head_only, params.common, backbone=checkpoint, arch="resnet18"
    )
    before, after = backbone.model.state_dict(), tuned.model.state_dict()
    # Every backbone tensor, BatchNorm running statistics included, is exactly as pretrained.
    for name, tensor in before.items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, after[name]), name
    assert after["fc.weight"].shape[0] == 5
    assert tuned.meta.classes == ["5", "6", "7", "8", "9"]
    assert tuned.meta.init.startswith("checkpoint:")


def test_finetune_is_deterministic_on_cpu_with_cached_augmented_views(
    prepared: tuple[Params, pd.DataFrame, Path],
) -> None:
    params, splits, dataset = prepared
    settings = params.finetune.model_copy(
        update={"head": params.finetune.head.model_copy(update={"views": 2, "epochs": 2})}
    )
    runs = [
        finetune(splits, dataset, settings, params.common, backbone=None, arch="resnet18")
        for _ in range(2)
    ]
    first, second = runs
    assert [r.phase for r in first.outcome.history] == ["head", "head", "unfreeze"]
    assert first.outcome.history == second.outcome.history
    assert first.meta == second.meta
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_finetuned_vgg_is_saved_in_torchvision_layout(
    prepared: tuple[Params, pd.DataFrame, Path], tmp_path: Path
) -> None:
    """VGG at 32 px trains folded (graft/training/folding.py), ends a plain torchvision VGG."""
    from graft.training.checkpoints import model_from_checkpoint, save_checkpoint
    from graft.training.models import build_model

    params, splits, dataset = prepared
    common = params.common.model_copy(update={"image_size": 32})
    tuned = finetune(splits, dataset, params.finetune, common, backbone=None, arch="vgg11")
    assert [r.phase for r in tuned.outcome.history] == ["head", "unfreeze"]
    reference = build_model("vgg11", num_classes=5).state_dict()
    state = tuned.model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    checkpoint = tmp_path / "vgg.pt"
    save_checkpoint(checkpoint, tuned.model, tuned.meta)
    loaded, _ = model_from_checkpoint(checkpoint)  # strict load into a fresh vgg11
    images = torch.randn(2, 3, 32, 32)
    loaded.eval(), tuned.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images), tuned.model(images))
