"""The registration gate names every metric that missed its threshold, and the model card
tells the whole result: each fact read from the stage's input files, worded for people."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from helpers import DEMO, ROOT, snippet_of, tiny_params
from torch import nn

from graft.config.params import Params, load_params, parse_params
from graft.data.decoding import decode_square
from graft.data.layout import manifest_path
from graft.hashing import file_sha256
from graft.registry.card_markdown import SNIPPET_IMAGE
from graft.registry.export import load_program
from graft.registry.package_layout import CARD_JSON, CARD_MARKDOWN, PROGRAM, WEIGHTS
from graft.registry.register import (
    GateError,
    data_summary,
    gate_failures,
    register,
    used_params,
)
from graft.training.checkpoints import CheckpointMeta, save_checkpoint
from graft.training.models import build_model


def metrics(accuracy: float, recalls: dict[str, float]) -> dict[str, object]:
    return {"accuracy": accuracy, "per_class": {k: {"recall": v} for k, v in recalls.items()}}


def test_gate_passes_and_fails_naming_metric_and_threshold() -> None:
    settings = load_params(ROOT / "params.yaml").registry.model_copy(
        update={"min_accuracy": 0.9, "min_class_recall": 0.8}
    )
    assert gate_failures(metrics(0.95, {"a": 0.9, "b": 1.0}), settings) == []
    failures = gate_failures(metrics(0.85, {"a": 0.7, "b": 1.0}), settings)
    assert failures == [
        "accuracy 0.8500 < register.min_accuracy 0.9",
        "recall of class 'a' 0.7000 < register.min_class_recall 0.8",
    ]


def test_data_summary_counts_rejections_by_reason_and_images_per_split() -> None:
    ingest = {
        "target": {
            "accepted": 3,
            "accepted_per_class": {"a": 2, "b": 1},
            "verdicts": {"accepted": 3, "corrupt": 1, "duplicate": 2, "zero_byte": 0},
        }
    }
    split = {"target": {"train": {"total": 3, "classes": {"a": 2, "b": 1}}}}
    summary = data_summary(ingest, split)
    # A duplicate is a second copy kept once, not an error: counted apart from rejections.
    assert summary["rejected"] == {"target": {"corrupt": 1}}
    assert summary["duplicates"] == {"target": 2}
    assert summary["accepted"] == {"target": {"total": 3, "classes": {"a": 2, "b": 1}}}
    assert summary["splits"] == split


def test_data_summary_orders_roles_and_splits_as_the_pipeline_runs() -> None:
    counts = {"total": 1, "classes": {"a": 1}}
    # As JSON with sorted keys has them: alphabetical, which puts test before train.
    split = {
        "target": {"test": counts, "train": counts, "val": counts},
        "pretrain": {"train": counts, "val": counts},
    }
    ingest: dict[str, Any] = {"target": {"verdicts": {}}, "pretrain": {"verdicts": {}}}
    summary = data_summary(ingest, split)
    assert list(summary["splits"]) == ["pretrain", "target"]
    assert list(summary["splits"]["target"]) == ["train", "val", "test"]
    assert list(summary["rejected"]) == list(summary["duplicates"]) == ["pretrain", "target"]


def test_card_params_are_exactly_the_params_the_stage_declares() -> None:
    # The card may only depend on what dvc.yaml declares, or `dvc repro` is not reproducible.
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]["params"]
    params = load_params(ROOT / "params.yaml")
    card_keys = {
        f"{section}.{key}" if section in ("register", "ingest") else section
        for section, values in used_params(params).items()
        for key in (values if section in ("register", "ingest") else [None])
    }
    assert card_keys == set(declared)
    assert "register.max_drop_vs_prod" not in card_keys


@dataclass(frozen=True)
class Inputs:
    """What the register stage reads, as written into a project folder by :func:`write_inputs`."""

    params: Params
    evaluation: dict[str, Any]
    ingest: dict[str, Any]
    split: dict[str, Any]
    training: dict[str, dict[str, Any]]  # each training stage's metrics.json
    history: pd.DataFrame  # finetune's history.csv
    finetuned: CheckpointMeta
    backbone: CheckpointMeta


def class_counts(classes: list[str], start: int) -> dict[str, Any]:
    per_class = {label: start + i for i, label in enumerate(classes)}
    return {"total": sum(per_class.values()), "classes": per_class}


def write_inputs(root: Path, *, gain: float, recalls: list[float] | None = None) -> Inputs:
    """Every file the register stage reads, under ``root`` (the project root), at the paths
    tiny params name: checkpoints, reports and metrics of every earlier stage. The fine-tuned
    model scores ``gain`` more test accuracy than the baseline (negative: less), and its
    classes have test ``recalls``."""
    params = parse_params(tiny_params(root / "sources"))
    paths = params.paths
    target, pretrain = ["5", "6", "7"], ["0", "1", "2", "3"]
    recalls = recalls or [0.91, 0.83, 0.97]
    accuracy = 0.9137
    evaluation = {
        "accuracy": accuracy,
        "balanced_accuracy": 0.9043,
        "macro_f1": 0.9011,
        "ece": 0.0375,
        "test_images": 57,
        "per_class": {
            label: {"precision": 0.9, "recall": recall, "f1": 0.9, "support": 19}
            for label, recall in zip(target, recalls, strict=True)
        },
        "transfer_gain": {
            "gain": gain,
            "macro_f1_gain": gain / 2,
            "pretrained_accuracy": accuracy,
            "pretrained_macro_f1": 0.9011,
            "scratch_accuracy": accuracy - gain,
            "scratch_macro_f1": 0.9011 - gain / 2,
        },
    }
    verdicts = {"accepted": 0, "corrupt": 0, "duplicate": 0, "zero_byte": 0}
    ingest = {
        "pretrain": {
            "files": 45, "accepted": 43, "accepted_per_class": {c: 10 for c in pretrain},
            "verdicts": {**verdicts, "accepted": 43, "duplicate": 2},
        },
        "target": {
            "files": 64, "accepted": 60, "accepted_per_class": {c: 20 for c in target},
            "verdicts": {**verdicts, "accepted": 60, "corrupt": 3, "zero_byte": 1},
        },
    }  # fmt: skip
    split = {  # roles and splits as sorted JSON keys have them
        "near_duplicates": {
            "pretrain": {"groups": 2, "images": 5, "largest": 3, "label_conflicts": 0},
            "target": {"groups": 1, "images": 2, "largest": 2, "label_conflicts": 1},
            "pretrain_overlap": {"images": 3, "excluded": 0},
        },
        "pretrain": {"train": class_counts(pretrain, 7), "val": class_counts(pretrain, 2)},
        "target": {
            "test": class_counts(target, 19),
            "train": class_counts(target, 5),
            "val": class_counts(target, 3),
        },
    }
    phases = ["head"] * 3 + ["unfreeze"] * 4
    history = pd.DataFrame(
        {
            "phase": phases,
            "epoch": range(1, len(phases) + 1),
            "val_accuracy": [0.5 + i / 20 for i in range(len(phases))],
        }
    )
    backbone = CheckpointMeta(
        arch="resnet18", classes=pretrain, image_size=16, mean=[0.5] * 3, std=[0.5] * 3,
        epoch=6, metrics={"val_accuracy": 0.95, "val_loss": 0.2}, init="scratch",
    )  # fmt: skip
    save_checkpoint(root / paths.pretrain.checkpoint, nn.Linear(2, 4), backbone)
    finetuned = CheckpointMeta(
        arch="resnet18", classes=target, image_size=16, mean=[0.5] * 3, std=[0.5] * 3,
        epoch=5, metrics={"val_accuracy": 0.875, "val_loss": 0.3}, init="checkpoint:ab12",
        extra={"backbone_init": "scratch", "best_phase": "unfreeze"},
    )  # fmt: skip
    # A real network: the stage exports it (graft.registry.export).
    save_checkpoint(root / paths.finetune.checkpoint, build_model("resnet18", 3), finetuned)
    training = {
        "pretrain": {"best_epoch": 6, "device": "cuda", "device_name": "Test GPU 80GB"},
        "finetune": {"best_epoch": 5, "device": "cpu"},
        "baseline": {"best_epoch": 7, "device": "cpu"},
    }
    files: dict[Path, Any] = {
        paths.evaluate.metrics: evaluation,
        paths.ingest.metrics: ingest,
        paths.split.metrics: split,
        **{getattr(paths, stage).metrics: figures for stage, figures in training.items()},
    }
    for path, payload in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(payload, sort_keys=True))
    (root / paths.finetune.history).parent.mkdir(parents=True, exist_ok=True)
    history.to_csv(root / paths.finetune.history, index=False)
    for path in (manifest_path(paths.ingest.dataset), paths.split.splits):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("role,path\n")
    return Inputs(params, evaluation, ingest, split, training, history, finetuned, backbone)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project root, the working directory (stages run from the project root)."""
    (tmp_path / "sources").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written_card(inputs: Inputs) -> tuple[dict[str, Any], str]:
    """Run the stage's core on ``inputs``; the package's model_card.json and model_card.md."""
    register(inputs.params)
    package = inputs.params.paths.registry.package
    card = json.loads((package / CARD_JSON).read_text())
    return card, (package / CARD_MARKDOWN).read_text()


def test_the_card_states_each_result_with_its_value_from_the_input_files(project: Path) -> None:
    inputs = write_inputs(project, gain=0.0374)
    card, text = written_card(inputs)
    metrics = inputs.evaluation
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert card["metrics"][name] == metrics[name]
    assert (
        f"**Test accuracy {metrics['accuracy']:.4f}** on {metrics['test_images']} target test "
        f"images; balanced accuracy {metrics['balanced_accuracy']:.4f}, macro F1 "
        f"{metrics['macro_f1']:.4f}, expected calibration error (ECE) {metrics['ece']:.4f}."
    ) in text

    # The transfer gain, its sign in words, in points of test accuracy.
    gain = metrics["transfer_gain"]
    points = round(gain["gain"] * 100, 1)
    assert points > 0
    assert f"**Transfer gain: pretraining helped: +{points:.1f} points of test accuracy**" in text
    assert f"{gain['scratch_accuracy']:.4f} for the same recipe from random weights" in text

    # The best epoch and phase the finetune stage kept (its checkpoint), and epochs per phase.
    history = inputs.history
    phase_of_best = history.loc[history["epoch"] == inputs.finetuned.epoch, "phase"].item()
    assert card["training"]["best_epoch"] == inputs.finetuned.epoch
    assert card["training"]["best_phase"] == inputs.finetuned.extra["best_phase"] == phase_of_best
    assert card["training"]["epochs"] == history["phase"].value_counts(sort=False).to_dict()
    head = int((history["phase"] == "head").sum())
    assert (
        f"- Fine-tuning: best epoch {inputs.finetuned.epoch} of {len(history)}, in the "
        f"`{phase_of_best}` phase"
    ) in text
    assert f"`head` epochs 1-{head}, `unfreeze` epochs {head + 1}-{len(history)}" in text

    # What the backbone was pretrained on: the pretraining corpus's classes and images.
    corpus = inputs.split["pretrain"]
    trained_on = card["weights_provenance"]["backbone"]["trained_on"]
    assert trained_on == {
        "role": "pretrain",
        "classes": len(inputs.backbone.classes),
        "images": {"train": corpus["train"]["total"], "val": corpus["val"]["total"]},
        "best_epoch": inputs.backbone.epoch,
    }
    assert (
        f"pretrained here from random weights on the `pretrain` source: "
        f"{len(inputs.backbone.classes)} classes ({', '.join(inputs.backbone.classes)}), "
        f"{corpus['train']['total']} train and {corpus['val']['total']} val images"
    ) in text
    assert "Backbone weights: `scratch`" not in text

    # The device each training stage recorded, not the setting alone.
    for stage, figures in inputs.training.items():
        assert card["training"]["device"][stage]["device"] == figures["device"]
    gpu = inputs.training["pretrain"]
    assert f"- Device: {gpu['device']}, {gpu['device_name']} (pretrain); cpu (finetune, " in text
    assert f"setting `common.device: {inputs.params.common.device}`" in text


def test_the_card_lists_splits_in_pipeline_order_and_duplicates_apart(project: Path) -> None:
    inputs = write_inputs(project, gain=0.01)
    card, text = written_card(inputs)
    rows = [
        tuple(cell.strip() for cell in line.strip("|").split("|")[:3])
        for line in text.split("## Data")[1].splitlines()
        if line.startswith("| pretrain") or line.startswith("| target")
    ]
    expected = [
        (role, split, str(inputs.split[role][split]["total"]))
        for role, splits in (("pretrain", ["train", "val"]), ("target", ["train", "val", "test"]))
        for split in splits
    ]
    assert rows == expected
    assert list(card["data"]["splits"]["target"]) == ["train", "val", "test"]

    for role, counts in inputs.ingest.items():
        verdicts = counts["verdicts"]
        duplicates = verdicts["duplicate"]
        rejected = {v: n for v, n in verdicts.items() if v not in ("accepted", "duplicate") and n}
        assert card["data"]["duplicates"][role] == duplicates
        assert card["data"]["rejected"][role] == rejected
        line = next(x for x in text.splitlines() if x.startswith(f"- Ingest ({role}):"))
        assert f"{counts['files']} files: {counts['accepted']} accepted, " in line
        assert f"{sum(rejected.values())} file" in line and "duplicate:" not in line
        kept = r" \(kept once\)" if duplicates else ""
        assert re.search(rf", {duplicates} duplicates? skipped{kept}$", line)
    target = inputs.ingest["target"]["verdicts"]
    assert f"rejected (corrupt: {target['corrupt']}, zero_byte: {target['zero_byte']})" in text


def test_a_negative_transfer_gain_says_pretraining_hurt_with_a_minus_sign(project: Path) -> None:
    inputs = write_inputs(project, gain=-0.0112)
    card, text = written_card(inputs)
    points = round(inputs.evaluation["transfer_gain"]["gain"] * 100, 1)
    assert points < 0
    assert f"**Transfer gain: pretraining hurt: {points:.1f} points of test accuracy**" in text
    assert f"hurt: -{abs(points):.1f} points" in text
    assert "helped" not in text
    assert card["metrics"]["transfer_gain"]["gain"] < 0


def test_the_gate_section_lists_each_threshold_with_the_measured_value(project: Path) -> None:
    inputs = write_inputs(project, gain=0.02, recalls=[0.97, 0.62, 0.88])
    settings = inputs.params.registry.model_copy(
        update={"min_accuracy": 0.9, "min_class_recall": 0.6}
    )
    inputs = replace(inputs, params=inputs.params.model_copy(update={"registry": settings}))
    card, text = written_card(inputs)
    per_class = inputs.evaluation["per_class"]
    lowest = min(per_class, key=lambda label: per_class[label]["recall"])
    assert card["gate"]["passed"] is True
    assert card["gate"]["checks"] == [
        {
            "metric": "accuracy",
            "value": inputs.evaluation["accuracy"],
            "threshold": settings.min_accuracy,
            "param": "register.min_accuracy",
            "passed": True,
        },
        {
            "metric": "lowest class recall",
            "class": lowest,
            "value": per_class[lowest]["recall"],
            "threshold": settings.min_class_recall,
            "param": "register.min_class_recall",
            "passed": True,
        },
    ]
    gate = text.split("## Gate: passed")[1].split("##")[0]
    assert (
        f"| test accuracy | {settings.min_accuracy} (`register.min_accuracy`) | "
        f"{inputs.evaluation['accuracy']:.4f} | passed |"
    ) in gate
    assert (
        f"| lowest class recall (class {lowest}) | {settings.min_class_recall} "
        f"(`register.min_class_recall`) | {per_class[lowest]['recall']:.4f} | passed |"
    ) in gate


def test_a_failed_gate_names_each_failing_metric_and_writes_no_card(project: Path) -> None:
    inputs = write_inputs(project, gain=0.02, recalls=[0.97, 0.62, 0.55])
    settings = inputs.params.registry.model_copy(
        update={"min_accuracy": 0.95, "min_class_recall": 0.6}
    )
    params = inputs.params.model_copy(update={"registry": settings})
    with pytest.raises(GateError) as caught:
        register(params)
    message = str(caught.value)
    assert f"accuracy {inputs.evaluation['accuracy']:.4f} < register.min_accuracy 0.95" in message
    assert "recall of class '7' 0.5500 < register.min_class_recall 0.6" in message
    assert "class '6'" not in message  # 0.62 passes
    assert not params.paths.registry.package.exists()


def test_the_card_shows_target_images_found_in_pretraining_and_near_duplicate_groups(
    project: Path,
) -> None:
    inputs = write_inputs(project, gain=0.0)
    card, text = written_card(inputs)
    near = inputs.split["near_duplicates"]
    assert card["data"]["near_duplicates"] == near
    rule = inputs.params.split.near_duplicates
    assert rule.pretrain_overlap == "report"
    assert (
        f"- Target images also in the pretraining corpus (identical or within "
        f"{rule.max_distance} bits): {near['pretrain_overlap']['images']}, kept in the target "
        "splits"
    ) in text
    found = near["target"]
    assert (
        f"- Near-duplicate groups (target): {found['groups']} ({found['images']} images), "
        f"{found['label_conflicts']} under two or more labels"
    ) in text
    assert "pretraining made no difference: 0.0 points of test accuracy" in text


# Runs the code on stdin with any import of graft failing, every warning an error.
SNIPPET_RUNNER = 'import sys; sys.modules["graft"] = None; exec(sys.stdin.read())'


def test_the_package_holds_the_weights_the_exported_program_and_the_card(project: Path) -> None:
    inputs = write_inputs(project, gain=0.01)
    card, text = written_card(inputs)
    package = inputs.params.paths.registry.package
    assert sorted(path.name for path in package.iterdir()) == sorted(
        [WEIGHTS, PROGRAM, CARD_JSON, CARD_MARKDOWN]
    )
    # The program is the package's model.pt, exported: its metadata names that file's hash.
    _, metadata = load_program(package / PROGRAM)
    assert metadata["weights_sha256"] == file_sha256(package / WEIGHTS)
    assert metadata["classes"] == inputs.finetuned.classes
    assert metadata["image_size"] == inputs.finetuned.image_size
    assert card["export"]["file"] == PROGRAM
    assert card["export"]["format"] == "torch.export"
    assert card["export"]["input"]["image_size"] == inputs.finetuned.image_size
    assert f"(here S = {inputs.finetuned.image_size})" in text

    # The card's own code, run in the package by a Python that cannot import graft, names the
    # class the program gives graft's decoding of a demo digit (opaque 8-bit: no difference),
    # and warns of nothing.
    digit = sorted((DEMO / "target" / "5").glob("digit-*.png"))[0]
    shutil.copyfile(digit, package / SNIPPET_IMAGE)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", SNIPPET_RUNNER],
        input=snippet_of(text), cwd=package, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    label, probability = done.stdout.split()
    pixels = decode_square(digit.read_bytes(), inputs.finetuned.image_size)
    program, _ = load_program(package / PROGRAM)
    with torch.no_grad():
        expected = program.module()(torch.from_numpy(pixels)[None])[0]
    assert label == inputs.finetuned.classes[int(expected.argmax())]
    assert float(probability) == pytest.approx(float(expected.max()), abs=1e-5)
