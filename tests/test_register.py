"""The registration gate names every metric that missed its threshold."""

from __future__ import annotations

from typing import Any

import yaml
from helpers import ROOT

from graft.config.params import load_params
from graft.registry.register import data_summary, gate_failures, render_markdown, used_params


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
    assert summary["rejected"] == {"target": {"corrupt": 1, "duplicate": 2}}
    assert summary["accepted"] == {"target": {"total": 3, "classes": {"a": 2, "b": 1}}}
    assert summary["splits"] == split


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


def test_the_card_shows_target_images_found_in_pretraining_and_near_duplicate_groups() -> None:
    near = {
        "pretrain": {"groups": 2, "images": 5, "largest": 3, "label_conflicts": 0},
        "target": {"groups": 1, "images": 2, "largest": 2, "label_conflicts": 1},
        "pretrain_overlap": {"images": 3, "excluded": 3},
    }
    split = {"target": {"test": {"total": 2, "classes": {"a": 1, "b": 1}}}}
    data = data_summary({}, {**split, "near_duplicates": near})
    assert data["splits"] == split and data["near_duplicates"] == near
    card: dict[str, Any] = {
        "name": "m",
        "architecture": "resnet18",
        "classes": ["a", "b"],
        "input": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "metrics": {"accuracy": 1.0, "macro_f1": 1.0, "test_images": 2, "per_class": {}},
        "training": {"init": "scratch", "seed": 1, "device_setting": "cpu"},
        "weights_provenance": {"backbone": {"init": "scratch", "arch": "resnet18", "classes": []}},
        "data": data,
        "params": {
            "split": {"near_duplicates": {"max_distance": 8, "pretrain_overlap": "exclude"}}
        },
        "inputs_sha256": {},
    }
    text = render_markdown(card)
    assert (
        "- Target images also in the pretraining corpus (identical or within 8 bits): 3, "
        "3 excluded from the target splits" in text
    )
    assert "- Near-duplicate groups (target): 1 (2 images), 1 under two or more labels" in text
    card["params"]["split"]["near_duplicates"]["pretrain_overlap"] = "report"
    assert "3, kept in the target splits" in render_markdown(card)
