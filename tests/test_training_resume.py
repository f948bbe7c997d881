"""The baseline stage resumes too: an interrupted run ends where an uninterrupted one does."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import BaseModel

from graft.config.params import Params, TrainPaths
from graft.training.device import resolve_device
from graft.training.finetune import finetune
from graft.training.history import EpochResult
from graft.training.loop import Interrupted
from graft.training.stage import run_training_stage
from graft.training.trained import TrainedModel


def test_an_interrupted_baseline_resumes_to_the_uninterrupted_result(
    prepared: tuple[Params, pd.DataFrame, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params, splits, dataset = prepared
    settings = params.finetune.model_copy(
        update={
            "head": params.finetune.head.model_copy(update={"epochs": 2}),
            "unfreeze": params.finetune.unfreeze.model_copy(update={"epochs": 2}),
        }
    )

    def baseline(resume: Path | None, stop_after: int | None = None) -> TrainedModel:
        def interrupt(result: EpochResult) -> None:
            if result.epoch == stop_after:
                raise Interrupted(f"stopped after epoch {result.epoch}")

        return finetune(
            splits, dataset, settings, params.common, backbone=None, arch="resnet18",
            resume=resume, after_epoch=interrupt,
        )  # fmt: skip

    whole = finetune(splits, dataset, settings, params.common, backbone=None, arch="resnet18")
    out = TrainPaths(
        checkpoint=tmp_path / "out" / "baseline.pt",
        metrics=tmp_path / "out" / "metrics.json",
        history=tmp_path / "out" / "history.csv",
        resume=tmp_path / "resume",
    )
    key: list[BaseModel | str] = [settings, params.common, "resnet18"]
    inputs: list[Path] = []
    with pytest.raises(Interrupted):  # in phase 2: phase 1 finished, one phase 2 epoch saved
        run_training_stage("baseline", out, key, inputs, lambda folder: baseline(folder, 3))
    assert out.resume is not None and any(out.resume.rglob("unfreeze.pt"))
    assert not out.checkpoint.exists()
    capsys.readouterr()
    resumed = run_training_stage("baseline", out, key, inputs, baseline)
    log = capsys.readouterr().err  # it continued, rather than training again from the start
    assert "head: resuming after epoch 2" in log and "unfreeze: resuming after epoch 1" in log
    assert "head epoch 1:" not in log
    assert [r.phase for r in resumed.outcome.history] == ["head"] * 2 + ["unfreeze"] * 2
    assert resumed.outcome.history == whole.outcome.history
    assert resumed.meta == whole.meta
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert out.checkpoint.is_file() and not out.resume.exists()  # the state is cleared
    # The metrics say where it trained: the setting (here "cpu"; often "auto") does not.
    recorded = json.loads(out.metrics.read_text())
    assert recorded["best_epoch"] == whole.meta.epoch
    assert recorded["device"] == resolve_device(params.common.device).type == "cpu"
    assert "device_name" not in recorded  # a GPU's model name, for CUDA only
