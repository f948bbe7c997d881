"""The registration gate names every metric that missed its threshold."""

from __future__ import annotations

from conftest import ROOT

from tasks.config import load_params
from tasks.register import gate_failures


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
