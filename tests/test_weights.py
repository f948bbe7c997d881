"""Where weights come from: ImageNet from the hub cache only (never a download), or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from graft.hashing import file_sha256
from graft.training.checkpoints import CheckpointMeta, save_checkpoint
from graft.training.models import build_model
from graft.training.weights import (
    WeightsError,
    backbone_weights,
    hub_file,
    imagenet_weights,
    starting_weights,
)


def test_missing_imagenet_weights_fail_at_once_naming_file_folder_and_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as raised:
        starting_weights("imagenet", "resnet18", 5)
    message = str(raised.value)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in message and str(folder) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not folder.exists()  # nothing was downloaded or created


def test_cached_imagenet_weights_load_and_record_their_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = imagenet_weights("resnet18", "IMAGENET1K_V1")
    path = hub_file(weights)
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=1000)
    torch.save(reference.state_dict(), path)
    start = starting_weights("imagenet:IMAGENET1K_V1", "resnet18", 5)
    assert start.init == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    assert start.provenance["sha256"] == file_sha256(path)
    assert start.provenance["matches_published_hash"] is False  # not the real file
    assert len(start.classes) == 1000 and start.classes[0] == "tench"
    assert torch.equal(start.model.state_dict()["fc.weight"], reference.fc.weight)


def test_unknown_weights_name_lists_the_known_ones() -> None:
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        imagenet_weights("resnet18", "IMAGENET9K")


def test_checkpoint_init_must_match_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    meta = CheckpointMeta("resnet18", ["a", "b"], 16, [0.5] * 3, [0.5] * 3, 1, {}, "scratch")
    save_checkpoint(path, build_model("resnet18", 2), meta)
    start = starting_weights(str(path), "resnet18", 7)
    assert start.classes == ["a", "b"] and start.init == f"checkpoint:{file_sha256(path)}"
    with pytest.raises(WeightsError, match=r"fit pretrain\.arch: .* resnet18 network, not mobile"):
        starting_weights(str(path), "mobilenet_v3_small", 7)
    with pytest.raises(WeightsError, match="does not exist"):
        starting_weights(str(tmp_path / "nope.pt"), "resnet18", 7)


def test_a_backbone_starts_in_its_own_architecture_with_a_new_head(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    meta = CheckpointMeta(
        "resnet18", ["a", "b"], 16, [0.5] * 3, [0.5] * 3, 1, {}, "imagenet:W", {"weights": {}}
    )
    save_checkpoint(path, build_model("resnet18", 2), meta)
    start = backbone_weights(path, "ignored_when_there_is_a_backbone", 5)
    assert start.arch == "resnet18" and start.init == f"checkpoint:{file_sha256(path)}"
    assert start.source == meta  # its own record, which the fine-tuned checkpoint carries on
    assert start.model.state_dict()["fc.weight"].shape == (5, 512)


def test_the_baseline_starts_from_the_random_weights_build_model_draws() -> None:
    torch.manual_seed(4)
    expected = build_model("resnet18", 3).state_dict()
    torch.manual_seed(4)
    start = backbone_weights(None, "resnet18", 3)
    assert start.init == "scratch" and start.source is None and start.provenance == {}
    for name, tensor in start.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_pretrain_passes_imagenet_weights_through_with_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    from graft.config.params import Augment, Common, Pretrain
    from graft.training.pretrain import pretrain

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = hub_file(imagenet_weights("resnet18", None))
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    settings = Pretrain(
        arch="resnet18", init="imagenet", epochs=0, batch_size=4, lr=1e-3, patience=1,
        augment=Augment(),
    )  # fmt: skip
    common = Common(seed=0, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")
    splits = pd.DataFrame({"role": ["pretrain"], "label": ["a"], "split": ["train"]})
    trained = pretrain(splits, tmp_path / "no-images-needed", settings, common)
    assert trained.meta.init == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    assert trained.meta.extra["weights"]["sha256"] == file_sha256(path)
    assert trained.outcome.history == [] and len(trained.meta.classes) == 1000


def test_scratch_with_no_epochs_is_refused_naming_the_key() -> None:
    from pydantic import ValidationError

    from graft.config.params import Augment, Pretrain

    with pytest.raises(ValidationError, match="epochs: 0"):
        Pretrain(
            arch="resnet18", init="scratch", epochs=0, batch_size=4, lr=1e-3, patience=1,
            augment=Augment(),
        )  # fmt: skip
