"""Evaluate: metrics on hand-made predictions, the mistakes grid, the real stages through DVC."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import run, tiny_params
from PIL import Image, ImageDraw, ImageFont

from graft.config.params import Common, Evaluate, ParamsError, parse_params
from graft.evaluation.evaluate import (
    SplitPredictions,
    calibration_table,
    classification_metrics,
    evaluate_checkpoints,
    evaluation,
    expected_calibration_error,
    predict_test_split,
    roc,
    transfer_gain,
)
from graft.evaluation.misclassified import (
    CAPTION,
    CELL,
    HEADER,
    PAD,
    grid_size,
    shorten_middle,
    write_grid,
)
from graft.training.checkpoints import CheckpointError, CheckpointMeta, save_checkpoint
from graft.training.models import build_model


def predictions(
    actual: list[str], predicted: list[str], confidence: list[float] | None = None
) -> pd.DataFrame:
    """A predictions table with made-up hashes and paths."""
    count = len(actual)
    return pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(count)],
            "path": [f"img-{i}.png" for i in range(count)],
            "actual": actual,
            "predicted": predicted,
            "confidence": confidence if confidence is not None else [0.9] * count,
        }
    )


def test_balanced_accuracy_averages_recall_over_classes() -> None:
    # Class a: 3 of 4 right (recall 0.75); class b: 1 of 2 (recall 0.5).
    table = predictions(["a", "a", "a", "a", "b", "b"], ["a", "a", "a", "b", "b", "a"])
    metrics = classification_metrics(table, ["a", "b"])
    assert metrics["test_images"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    per_class: Any = metrics["per_class"]
    assert per_class["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert per_class["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["macro_f1"] == pytest.approx(0.625)


def test_expected_calibration_error_by_hand() -> None:
    # Four equal-width bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; edges exact in binary.
    #   bin 1: .5 (right edge belongs to the bin) right, .4 wrong -> acc .5, conf .45, gap .05
    #   bin 2: .75, .65 both wrong                                -> acc 0,  conf .7,  gap .7
    #   bin 3: 1.0, .9, .8, .9, three right                       -> acc .75, conf .9, gap .15
    # ECE = (2 * .05 + 2 * .7 + 4 * .15) / 8 = 2.1 / 8
    confidence = [0.5, 0.4, 0.75, 0.65, 1.0, 0.9, 0.8, 0.9]
    right = [True, False, False, False, True, True, False, True]
    actual = ["x"] * 8
    table = predictions(actual, ["x" if ok else "y" for ok in right], confidence)
    calibration = calibration_table(table, bins=4)
    assert calibration["bin"].tolist() == [1, 2, 3]
    assert calibration["lower"].tolist() == [0.25, 0.5, 0.75]
    assert calibration["upper"].tolist() == [0.5, 0.75, 1.0]
    assert calibration["images"].tolist() == [2, 2, 4]
    assert calibration["confidence"].tolist() == pytest.approx([0.45, 0.7, 0.9])
    assert calibration["accuracy"].tolist() == pytest.approx([0.5, 0.0, 0.75])
    assert expected_calibration_error(calibration) == pytest.approx(2.1 / 8)


def test_perfectly_calibrated_predictions_have_zero_ece() -> None:
    table = predictions(["x", "x", "x", "x"], ["x", "x", "y", "y"], [0.5] * 4)
    assert expected_calibration_error(calibration_table(table, bins=15)) == 0.0


def binary(actual: list[str], p_dog: list[float]) -> SplitPredictions:
    probabilities = np.array([[1 - p, p] for p in p_dog])
    predicted = ["dog" if p > 0.5 else "cat" for p in p_dog]
    table = predictions(actual, predicted, probabilities.max(axis=1).tolist())
    return SplitPredictions(table, probabilities, ["cat", "dog"])


def test_roc_auc_for_two_classes_by_hand() -> None:
    # Positive class "dog" (the second). Of the 4 (dog, cat) pairs, 3 rank the dog higher.
    test = binary(["cat", "cat", "dog", "dog"], [0.1, 0.6, 0.4, 0.8])
    auc, curve = roc(test)
    assert auc == pytest.approx(0.75)
    assert curve["fpr"].iloc[-1] == 1.0 and curve["tpr"].iloc[-1] == 1.0
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(0.75)
    assert evaluation(test, calibration_bins=15).metrics["roc_auc"] == pytest.approx(0.75)


def test_no_roc_auc_for_more_classes_or_a_single_class_present() -> None:
    table = predictions(["a", "b", "c"], ["a", "b", "b"], [0.8, 0.7, 0.6])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.6, 0.3]])
    multiclass = SplitPredictions(table, probabilities, ["a", "b", "c"])
    scored = evaluation(multiclass, calibration_bins=15)
    assert "roc_auc" not in scored.metrics and "ece" in scored.metrics
    assert scored.roc.empty and list(scored.roc.columns) == ["fpr", "tpr", "threshold"]
    auc, curve = roc(binary(["dog", "dog"], [0.7, 0.2]))
    assert auc is None and curve.empty


def test_transfer_gain_is_pretrained_minus_scratch() -> None:
    gain = transfer_gain({"accuracy": 0.9, "macro_f1": 0.8}, {"accuracy": 0.75, "macro_f1": 0.7})
    assert gain["pretrained_accuracy"] == 0.9 and gain["scratch_accuracy"] == 0.75
    assert gain["gain"] == pytest.approx(0.15)
    assert gain["macro_f1_gain"] == pytest.approx(0.1)


def test_baseline_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    def checkpoint(name: str, classes: list[str], arch: str = "resnet18") -> Path:
        meta = CheckpointMeta(arch, classes, 16, [0.5] * 3, [0.5] * 3, 1, {}, "scratch")
        save_checkpoint(tmp_path / name, build_model(arch, len(classes)), meta)
        return tmp_path / name

    finetuned = checkpoint("f.pt", ["a", "b"])
    settings = Evaluate(batch_size=8)
    common = Common(seed=0, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")

    def refusal(baseline: Path) -> str:
        with pytest.raises(CheckpointError) as caught:
            evaluate_checkpoints(finetuned, baseline, pd.DataFrame(), tmp_path, settings, common)
        return str(caught.value)

    other_classes = refusal(checkpoint("b.pt", ["a", "c"]))
    assert "classes ['a', 'c']" in other_classes
    assert "not in the checkpoint: ['b']; only in the checkpoint: ['c']" in other_classes
    assert other_classes.endswith(f"it must match {finetuned}: re-run the baseline stage")
    other_arch = refusal(checkpoint("s.pt", ["a", "b"], arch="mobilenet_v3_small"))
    assert "holds a mobilenet_v3_small network, not resnet18" in other_arch
    assert other_arch.endswith("re-run the baseline stage")


def test_predicting_leaves_the_callers_random_state_alone(tmp_path: Path) -> None:
    hashes = [store(tmp_path, Image.new("RGB", (8, 8), (60 * i, 0, 0))) for i in range(4)]
    labels, paths = ["a", "a", "b", "b"], [f"{i}.png" for i in range(4)]
    splits = pd.DataFrame(
        {"role": "target", "sha256": hashes, "label": labels, "split": "test", "path": paths}
    )
    meta = CheckpointMeta("resnet18", ["a", "b"], 16, [0.5] * 3, [0.5] * 3, 1, {}, "scratch")
    common = Common(seed=3, image_size=32, mean=(0.1,) * 3, std=(0.9,) * 3, device="cpu")
    model, before = build_model("resnet18", 2), torch.random.get_rng_state()
    first = predict_test_split(model, meta, splits, tmp_path, common, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # seeded inside, restored after
    again = predict_test_split(model, meta, splits, tmp_path, common, batch_size=3)
    assert first.table.equals(again.table) and first.probabilities.shape == (4, 2)
    assert first.table["actual"].tolist() == labels


def bad_param_message(sources: Path, key: str, value: object) -> str:
    params = tiny_params(sources)
    params["evaluate"][key] = value
    with pytest.raises(ParamsError) as caught:
        parse_params(params)
    return str(caught.value)


def test_bad_evaluate_params_are_named(sources: Path) -> None:
    assert "evaluate.misclassified" in bad_param_message(sources, "misclassified", 0)
    assert "evaluate.calibration_bins" in bad_param_message(sources, "calibration_bins", 0)


def store(dataset: Path, image: Image.Image) -> str:
    """Put ``image`` into an ingested-dataset layout, as ingest does; return its hash."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    path = dataset / "images" / sha[:2] / sha  # the one-file-per-image layout, still read
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return sha


def test_grid_shows_the_most_confident_mistakes_first(tmp_path: Path) -> None:
    dataset = tmp_path / "ingested"
    colours = ["red", "green", "blue", "yellow", "white"]
    # Tiny (8x8) and large (300x200) images: enlarged sharply and shrunk to fit a cell.
    sizes = [(8, 8), (300, 200), (8, 8), (8, 8), (8, 8)]
    hashes = [store(dataset, Image.new("RGB", s, c)) for s, c in zip(sizes, colours, strict=True)]
    table = pd.DataFrame(
        {
            "sha256": hashes,
            "path": [f"{c}.png" for c in colours],
            "actual": ["5", "6", "7", "8", "9"],
            "predicted": ["6", "5", "7", "9", "8"],  # "7" is right: never in the grid
            "confidence": [0.7, 0.99, 1.0, 0.5, 0.6],
        }
    )
    grid_file = tmp_path / "out" / "misclassified.png"
    write_grid(grid_file, table, dataset, limit=3)
    with Image.open(grid_file) as grid:
        assert grid.format == "PNG"
        assert grid.size == grid_size(3)
        rgb = grid.convert("RGB")
        # Cells left to right by confidence: green (0.99), red (0.7), white (0.6); yellow is cut.
        cell_centres = [(PAD + i * (CELL + PAD) + CELL // 2, HEADER + CELL // 2) for i in range(4)]
        assert [rgb.getpixel(xy) for xy in cell_centres] == [
            (0, 128, 0),
            (255, 0, 0),
            (255, 255, 255),
            (255, 255, 255),  # no fourth cell: background
        ]
        caption = rgb.crop((PAD, HEADER + CELL, PAD + CELL, HEADER + CELL + CAPTION))
        assert np.asarray(caption).min() < 128  # the labels are drawn
    assert not list(grid_file.parent.glob(".*tmp*"))  # written atomically, nothing left over

    write_grid(grid_file, table, dataset, limit=16)  # more room than mistakes: all four
    with Image.open(grid_file) as grid:
        assert grid.size == grid_size(4)


def test_grid_width_never_depends_on_the_mistakes(tmp_path: Path) -> None:
    dataset = tmp_path / "ingested"
    hashes = [store(dataset, Image.new("RGB", (8, 8), (20 * i, 0, 0))) for i in range(10)]

    def rendered_size(mistakes: int, limit: int = 16) -> tuple[int, int]:
        count = mistakes + 1  # and one right prediction, never drawn
        table = pd.DataFrame(
            {
                "sha256": hashes[:count],
                "path": [f"{i}.png" for i in range(count)],
                "actual": ["a"] * count,
                "predicted": ["b"] * mistakes + ["a"],
                "confidence": [0.9] * count,
            }
        )
        write_grid(tmp_path / "grid.png", table, dataset, limit=limit)
        with Image.open(tmp_path / "grid.png") as grid:
            return grid.size

    sizes = {mistakes: rendered_size(mistakes) for mistakes in (0, 1, 3, 4, 5, 9)}
    assert sizes == {mistakes: grid_size(mistakes) for mistakes in sizes}
    assert len({width for width, _ in sizes.values()}) == 1  # one width for every count
    assert sizes[1][1] == sizes[4][1] < sizes[5][1] < sizes[9][1]  # four cells to a row
    assert rendered_size(9, limit=3) == grid_size(3) == sizes[3]  # only ``limit`` are drawn


def test_each_tile_names_the_file_it_came_from(tmp_path: Path) -> None:
    dataset = tmp_path / "ingested"
    sha = store(dataset, Image.new("RGB", (8, 8), "black"))

    def source_line(path: str) -> np.ndarray:
        table = pd.DataFrame(
            {"sha256": [sha], "path": [path], "actual": ["a"], "predicted": ["b"],
             "confidence": [0.9]}
        )  # fmt: skip
        write_grid(tmp_path / "grid.png", table, dataset, limit=16)
        with Image.open(tmp_path / "grid.png") as grid:
            # The first caption line under the tile: the file's path in its source.
            pixels = np.asarray(grid.convert("L"))
            return pixels[HEADER + CELL : HEADER + CELL + 14, PAD : PAD + CELL + PAD]

    short, other = source_line("a/1.png"), source_line("a/2.png")
    assert short.min() < 160  # drawn
    assert not np.array_equal(short, other)  # and it is the path that is drawn
    long = source_line("a/" + "very-long-folder-name/" * 5 + "scan-0042.png")
    assert long.min() < 160 and long[:, CELL:].min() == 255  # cut to the tile's width


def test_a_long_path_keeps_both_ends() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=12)
    path = "cats/" + "holiday-2019-beach-" * 6 + "IMG_0042.jpg"
    short = shorten_middle(draw, path, CELL, font)
    assert short.startswith("cats/") and short.endswith(".jpg") and "…" in short
    assert draw.textlength(short, font=font) <= CELL
    assert shorten_middle(draw, "cats/1.jpg", CELL, font) == "cats/1.jpg"  # fits: as is


def test_grid_says_so_when_nothing_is_misclassified(tmp_path: Path) -> None:
    table = predictions(["a", "b"], ["a", "b"])
    grid_file = tmp_path / "misclassified.png"
    write_grid(grid_file, table, tmp_path / "no-images-needed", limit=16)
    with Image.open(grid_file) as grid:
        grid.load()
        assert grid.size == grid_size(0)
        assert np.asarray(grid.convert("L")).min() < 128  # the message is drawn in dark text


@pytest.mark.slow
def test_stages_write_every_output_that_dvc_reads(dvc_project: Path) -> None:
    repo = dvc_project
    run(["dvc", "repro", "evaluate"], repo)
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics["test_images"] == 15  # 3 per class of the 5 target classes
    assert set(metrics["per_class"]) == {"5", "6", "7", "8", "9"}
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    assert "roc_auc" not in metrics  # five classes
    gain = metrics["transfer_gain"]
    assert gain["pretrained_accuracy"] == metrics["accuracy"]
    assert gain["gain"] == pytest.approx(gain["pretrained_accuracy"] - gain["scratch_accuracy"])

    baseline = torch.load(repo / "models/baseline.pt", weights_only=True)
    assert baseline["meta"]["init"] == "scratch" and baseline["meta"]["arch"] == "resnet18"
    finetuned = torch.load(repo / "models/finetuned.pt", weights_only=True)
    assert finetuned["meta"]["init"].startswith("checkpoint:")

    calibration = pd.read_csv(repo / "reports/evaluate/calibration.csv")
    assert calibration["images"].sum() == 15
    assert expected_calibration_error(calibration) == pytest.approx(metrics["ece"])
    with Image.open(repo / "reports/evaluate/misclassified.png") as grid:
        assert grid.format == "PNG" and grid.width == grid_size(0)[0]

    (workspace_metrics,) = json.loads(
        run(["dvc", "metrics", "show", "--json"], repo).stdout
    ).values()
    workspace = workspace_metrics["data"]
    evaluate_shown = workspace["reports/evaluate/metrics.json"]["data"]
    assert evaluate_shown["transfer_gain"]["scratch_accuracy"] == gain["scratch_accuracy"]
    assert "reports/baseline/metrics.json" in workspace
    # Plots are images only (Vega's, fetched from a CDN, stay blank offline): the grid here,
    # the figures stage's PNGs once it has run.
    run(["dvc", "repro", "figures"], repo)
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert {entry[0]["type"] for entry in plots.values()} == {"image"}
    assert plots["reports/evaluate/misclassified.png"]
    figures = {Path(name).name for name in plots if name.startswith("reports/figures/")}
    expected = {"training_curves.png", "transfer.png", "confusion_matrix.png", "reliability.png"}
    assert figures == expected  # no roc.png for five classes
