"""Figures: every PNG is valid and byte-for-byte reproducible, ROC only with two classes, the
head-to-unfreeze switch found from the phase column, and the figures stage declared in
dvc.yaml as image plots that nothing upstream depends on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, tool_env
from PIL import Image

from graft.evaluation import figures
from graft.evaluation.figures import (
    confusion_matrix,
    reliability_diagram,
    roc_curve,
    switch_epoch,
    training_curves,
    transfer_curves,
    write_figures,
)


def history(phases: list[tuple[str, int]], spike: float = 1.0) -> pd.DataFrame:
    """A history table with ``count`` epochs of each ``(phase, count)``, loss falling and
    accuracy rising; the first epoch's validation loss is multiplied by ``spike``."""
    names = [phase for phase, count in phases for _ in range(count)]
    epochs = np.arange(1, len(names) + 1)
    loss = 2.0 / epochs
    val_loss = loss * 1.1
    val_loss[0] *= spike
    return pd.DataFrame(
        {
            "phase": names,
            "epoch": epochs,
            "train_loss": loss,
            "train_accuracy": 1 - loss / 2.5,
            "val_loss": val_loss,
            "val_accuracy": 1 - loss / 3,
            "lr": 0.001,
        }
    )


FINETUNE = history([("head", 4), ("unfreeze", 5)])
BASELINE = history([("head", 3), ("unfreeze", 5)])
HISTORIES = {"pretrain": history([("pretrain", 6)], spike=40.0), "finetune": FINETUNE,
             "baseline": BASELINE}  # fmt: skip
GAIN = {"pretrained_accuracy": 0.9, "scratch_accuracy": 0.85, "gain": 0.05}


def predictions(classes: list[str]) -> pd.DataFrame:
    """Twelve predictions over ``classes``, most right, two wrong."""
    actual = [classes[i % len(classes)] for i in range(12)]
    predicted = list(actual)
    predicted[0], predicted[1] = classes[1], classes[0]
    return pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(12)],
            "path": [f"{a}/img-{i}.png" for i, a in enumerate(actual)],
            "actual": actual,
            "predicted": predicted,
            "confidence": np.linspace(0.5, 0.99, 12),
        }
    )


CALIBRATION = pd.DataFrame(
    {
        "bin": [7, 12, 14],
        "lower": [7 / 15, 12 / 15, 14 / 15],
        "upper": [8 / 15, 13 / 15, 1.0],
        "images": [2, 3, 7],
        "confidence": [0.5, 0.83, 0.97],
        "accuracy": [0.5, 0.67, 1.0],
    }
)
ROC_ROWS = pd.DataFrame({"fpr": [0.0, 0.0, 0.5, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0],
                         "threshold": [np.inf, 0.9, 0.6, 0.1]})  # fmt: skip
NO_ROC = pd.DataFrame(columns=["fpr", "tpr", "threshold"])


def metrics(roc_auc: float | None) -> dict[str, object]:
    found: dict[str, object] = {"ece": 0.04, "transfer_gain": GAIN}
    if roc_auc is not None:
        found["roc_auc"] = roc_auc
    return found


DRAWINGS: dict[str, Callable[[Path], object]] = {
    "training curves": lambda out: training_curves(HISTORIES, out),
    "transfer": lambda out: transfer_curves(FINETUNE, BASELINE, GAIN, out),
    "confusion matrix": lambda out: confusion_matrix(predictions(["cat", "dog", "eel"]), out),
    "reliability diagram": lambda out: reliability_diagram(CALIBRATION, 0.04, out),
    "roc": lambda out: roc_curve(ROC_ROWS, 0.75, "dog", out),
}


@pytest.mark.parametrize("name", DRAWINGS)
def test_each_figure_is_a_png_and_the_same_data_draws_the_same_bytes(
    name: str, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / "figure.png", tmp_path / "b" / "figure.png"
    DRAWINGS[name](first)
    DRAWINGS[name](second)
    with Image.open(first) as image:
        image.load()
        assert image.format == "PNG" and image.width > 200 and image.height > 200
        assert "Software" not in image.info  # nothing that names the matplotlib version
        pixels = np.asarray(image.convert("L"))
        assert pixels.min() < 100 and pixels.max() > 200  # something is drawn on a light ground
    assert first.read_bytes() == second.read_bytes()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_different_data_draws_different_bytes(tmp_path: Path) -> None:
    # Guards the test above: identical bytes must come from the data, not a blank canvas.
    training_curves(HISTORIES, tmp_path / "a.png")
    changed = {**HISTORIES, "baseline": history([("head", 3), ("unfreeze", 6)])}
    training_curves(changed, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_drawing_leaves_matplotlib_settings_alone(tmp_path: Path) -> None:
    import matplotlib

    before = dict(matplotlib.rcParams)
    training_curves(HISTORIES, tmp_path / "curves.png")
    assert dict(matplotlib.rcParams) == before


def test_the_switch_is_the_first_unfreeze_epoch_after_a_head_phase() -> None:
    assert switch_epoch(FINETUNE) == 5
    assert switch_epoch(BASELINE) == 4
    assert switch_epoch(history([("pretrain", 6)])) is None  # pretraining has no phases
    assert switch_epoch(history([("head", 3)])) is None  # stopped before, or blocks: 0
    assert switch_epoch(history([("unfreeze", 3)])) is None  # no head phase before it
    late_start = history([("head", 2), ("unfreeze", 2)]).assign(epoch=[7, 8, 9, 10])
    assert switch_epoch(late_start) == 9  # the epoch column, not the row number


def test_roc_only_with_two_classes(tmp_path: Path) -> None:
    assert roc_curve(NO_ROC, None, None, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()

    two = tmp_path / "two"
    written = write_figures(two, HISTORIES, predictions(["cat", "dog"]), CALIBRATION, ROC_ROWS,
                            metrics(0.75))  # fmt: skip
    assert (two / figures.ROC).is_file() and two / figures.ROC in written

    # Three classes: evaluate's ROC table has no rows. The folder is replaced whole, so the
    # two-class run's ROC figure is gone too: no stale file, no empty panel.
    written = write_figures(two, HISTORIES, predictions(["cat", "dog", "eel"]), CALIBRATION,
                            NO_ROC, metrics(None))  # fmt: skip
    names = sorted(path.name for path in two.iterdir())
    assert names == sorted(
        [figures.TRAINING_CURVES, figures.TRANSFER, figures.CONFUSION, figures.RELIABILITY]
    )
    assert sorted(path.name for path in written) == names


def test_a_history_without_epochs_is_drawn_as_a_note(tmp_path: Path) -> None:
    empty = history([("pretrain", 1)]).iloc[:0]
    training_curves({**HISTORIES, "pretrain": empty}, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="no training history"):
        training_curves({}, tmp_path / "none.png")


def test_the_stage_draws_from_the_report_files(tmp_path: Path) -> None:
    """`python -m tasks.figures` in a project folder: reads the files params.yaml names."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = params["paths"]
    for stage, table in HISTORIES.items():
        out = tmp_path / paths[stage]["history"]
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    evaluated = {key: tmp_path / value for key, value in paths["evaluate"].items()}
    evaluated["metrics"].parent.mkdir(parents=True, exist_ok=True)
    predictions(["5", "6", "7"]).to_csv(evaluated["predictions"], index=False)
    CALIBRATION.to_csv(evaluated["calibration"], index=False)
    NO_ROC.to_csv(evaluated["roc"], index=False)
    evaluated["metrics"].write_text(json.dumps(metrics(None)))

    env = tool_env()
    env["PYTHONPATH"] = str(ROOT)  # tasks/ is run from the project root, not installed
    result = subprocess.run([sys.executable, "-m", "tasks.figures"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = tmp_path / paths["figures"]["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [figures.TRAINING_CURVES, figures.TRANSFER, figures.CONFUSION, figures.RELIABILITY]
    )


def dvc_stages() -> dict[str, dict[str, object]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert isinstance(stages, dict)
    return stages


def test_the_figures_stage_declares_its_folder_as_plots_after_evaluate() -> None:
    document = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = document["stages"]
    stage = stages["figures"]
    assert stage["cmd"] == "python -m tasks.figures"
    assert stage["plots"] == ["${paths.figures.folder}"]  # image plots: the PNG files
    assert "outs" not in stage and "params" not in stage  # reads no setting but paths
    reports = {
        "${paths.pretrain.history}", "${paths.finetune.history}", "${paths.baseline.history}",
        "${paths.evaluate.metrics}", "${paths.evaluate.predictions}",
        "${paths.evaluate.calibration}", "${paths.evaluate.roc}",
    }  # fmt: skip
    assert reports <= set(stage["deps"])
    # The reports are outputs of the stages that write them, so DVC orders figures after them.
    declared = {
        out if isinstance(out, str) else next(iter(out))
        for name, other in stages.items()
        if name != "figures"
        for out in [*other.get("outs", []), *other.get("metrics", [])]
    }
    assert reports <= declared
    # No Vega plots, which render blank offline: no top-level plots and no CSV plots.
    assert "plots" not in document
    for name, other in stages.items():
        for plot in other.get("plots", []):
            target = plot if isinstance(plot, str) else next(iter(plot))
            assert not target.endswith(".csv"), (name, plot)


def test_nothing_upstream_depends_on_the_plotting_code() -> None:
    deps = {name: stage.get("deps", []) for name, stage in dvc_stages().items()}
    assert "graft/evaluation/figures.py" in deps.pop("figures")  # type: ignore[operator]
    for name, listed in deps.items():
        assert isinstance(listed, list)
        assert "graft/evaluation/figures.py" not in listed, name
        assert "${paths.figures.folder}" not in listed, name
