"""An interrupted fit resumes from its last epoch and ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft.config.params import Augment, Common
from graft.data.loaders import ImageSet, InMemoryImages, make_loader
from graft.training.determinism import seeded
from graft.training.history import EpochResult, FitOutcome
from graft.training.loop import Interrupted, fit
from graft.training.models import build_model

COMMON = Common(seed=5, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")


def run(resume: Path | None, stop_after: int | None = None) -> tuple[torch.nn.Module, FitOutcome]:
    """One process's worth of work: seed, build, load data, fit (as the stage does)."""
    with seeded(COMMON.seed):
        model = build_model("resnet18", 3)
        images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
        labels = torch.arange(24) % 3
        data = ImageSet(
            InMemoryImages(images), labels, ["a", "b", "c"], ["0" * 64] * 24, ["x"] * 24
        )
        train = make_loader(data, COMMON, batch_size=8, augment=Augment(rotation=10), shuffle=True)
        val = make_loader(data, COMMON, batch_size=8)

        def interrupt(result: EpochResult) -> None:
            if result.epoch == stop_after:
                raise Interrupted(f"stopped after epoch {result.epoch}")

        outcome = fit(
            model, [{"params": list(model.parameters()), "lr": 1e-3}], train, val,
            epochs=4, patience=10, device=torch.device("cpu"), phase="pretrain",
            resume=resume, after_epoch=interrupt,
        )  # fmt: skip
    return model, outcome


def test_resumed_fit_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    whole_model, whole = run(None)
    state = tmp_path / "resume" / "pretrain.pt"
    with pytest.raises(Interrupted):
        run(state, stop_after=2)
    assert state.is_file()
    resumed_model, resumed = run(state)
    assert resumed.history == whole.history  # epochs 1-2 from the file, 3-4 trained again
    assert resumed.best == whole.best
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    finished_model, finished = run(state)  # a finished state: nothing left to train
    assert finished.history == whole.history
    fc = "fc.weight"
    assert torch.equal(finished_model.state_dict()[fc], whole_model.state_dict()[fc])
