"""Checkpoints load with weights_only=True and refuse what does not fit; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft.atomic import atomic_path, write_json
from graft.training.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from graft.training.models import build_model


def meta(classes: list[str]) -> CheckpointMeta:
    return CheckpointMeta(
        arch="resnet18",
        classes=classes,
        image_size=16,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        epoch=3,
        metrics={"val_accuracy": 0.9},
        init="scratch",
    )


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = build_model("resnet18", 3)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, meta(["a", "b", "c"]))
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled classes
    assert raw["meta"]["classes"] == ["a", "b", "c"]
    loaded, loaded_meta = model_from_checkpoint(path)
    assert loaded_meta == meta(["a", "b", "c"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


def test_mismatched_classes_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("resnet18", 3), meta(["a", "b"]))  # card says 2 classes
    with pytest.raises(CheckpointError, match="do not fit resnet18 with 2 classes"):
        model_from_checkpoint(path)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a graft checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_crash_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"accuracy": 0.')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "accuracy": 0.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_directory_output_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "package"
    with atomic_path(target, directory=True) as staging:
        (staging / "old.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as staging:
        (staging / "new.txt").write_text("v2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_path(target, directory=True) as staging:
        (staging / "new.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package"]


def test_checkpoint_for_other_classes_or_arch_is_a_clear_error(tmp_path: Path) -> None:
    from graft.training.checkpoints import check_fits

    path = tmp_path / "model.pt"
    card = meta(["a", "b", "c"])
    check_fits(card, path, classes=["a", "b", "c"], arch="resnet18")
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: \['d'\]"):
        check_fits(card, path, classes=["a", "b", "d"], arch="resnet18")
    with pytest.raises(
        CheckpointError, match=r"not in the checkpoint: \[\]; only in the checkpoint: \['c'\]"
    ):
        check_fits(card, path, classes=["a", "b"], arch="resnet18")
    with pytest.raises(CheckpointError, match="another order"):
        check_fits(card, path, classes=["c", "b", "a"], arch="resnet18")
    with pytest.raises(CheckpointError, match="holds a resnet18 network, not vgg16"):
        check_fits(card, path, classes=["a", "b", "c"], arch="vgg16")
    check_fits(card, path, arch="resnet18")  # the architecture alone, for any classes
    with pytest.raises(CheckpointError, match="holds a resnet18 network, not vgg16"):
        check_fits(card, path, arch="vgg16")
