"""Stage ``register``: gate the model on its test metrics and package it with a model card.

The package (``paths.register.package``) holds ``model.pt`` (the fine-tuned checkpoint, loadable
with ``torch.load(weights_only=True)``), ``model.pt2`` (the same model with its preprocessing as a
``torch.export`` program, loadable without graft: graft/registry/export.py), ``model_card.json``
and ``model_card.md``. When the gate fails the stage fails, naming each metric that missed its
threshold, and writes nothing.

The card holds only what this stage's declared deps and params determine, so ``dvc repro`` on a
fresh clone reproduces it byte for byte. The code commit, the dirty flag, the environment and the
comparison with the production version depend on git state and the machine: ``graft publish``
records them in the version's git tag instead (see graft/registry/publish.py).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft import atomic
from graft.config.params import ROLES, Params, Register
from graft.data.layout import manifest_path
from graft.data.schemas import SPLITS
from graft.errors import GraftError
from graft.hashing import file_sha256
from graft.registry import export
from graft.registry.card_markdown import render_markdown
from graft.registry.package_layout import CARD_JSON, CARD_MARKDOWN, PROGRAM, WEIGHTS
from graft.training.checkpoints import load_checkpoint

# The register params the stage uses (dvc.yaml lists the same keys); max_drop_vs_prod is
# publish's, so changing it must not re-run the stage.
GATE_KEYS = ("name", "min_accuracy", "min_class_recall")


class GateError(GraftError):
    """The model's metrics do not meet the thresholds in params (register.*)."""


@dataclass(frozen=True)
class GateCheck:
    """One comparison of the gate: ``metric`` (named for people), its measured ``value`` and
    the ``threshold`` it must reach (both 0-1), set by the params key ``param``."""

    metric: str
    value: float
    threshold: float
    param: str

    @property
    def passed(self) -> bool:
        """Whether the value reaches the threshold (equal passes)."""
        return self.value >= self.threshold

    def failure(self) -> str:
        """Why this check fails, for people: the metric, its value and the threshold."""
        return f"{self.metric} {self.value:.4f} < {self.param} {self.threshold}"


def gate_checks(metrics: dict[str, Any], settings: Register) -> list[GateCheck]:
    """Every comparison the gate makes on test ``metrics`` (accuracy and per-class recall,
    0-1) under the thresholds ``settings``: accuracy first, then each class's recall in the
    metrics' class order. Raises KeyError when ``metrics`` lacks accuracy, per_class or a
    class's recall."""
    checks = [GateCheck("accuracy", metrics["accuracy"], settings.min_accuracy, _MIN_ACCURACY)]
    for label, scores in metrics["per_class"].items():
        checks.append(
            GateCheck(
                f"recall of class {label!r}",
                scores["recall"],
                settings.min_class_recall,
                _MIN_CLASS_RECALL,
            )
        )
    return checks


_MIN_ACCURACY, _MIN_CLASS_RECALL = "register.min_accuracy", "register.min_class_recall"


def gate_failures(metrics: dict[str, Any], settings: Register) -> list[str]:
    """Why a model with these test ``metrics`` (accuracy and per-class recall, 0-1) may not be
    registered under the thresholds ``settings``; empty when it passes. Raises KeyError when
    ``metrics`` lacks accuracy, per_class or a class's recall."""
    return [check.failure() for check in gate_checks(metrics, settings) if not check.passed]


def gate_record(metrics: dict[str, Any], settings: Register) -> dict[str, Any]:
    """The card's ``gate`` section: both thresholds, whether every check passed, and the
    checks a person reads (``checks``: test accuracy, and the lowest class recall with its
    class; each with ``value``, ``threshold``, ``param`` and ``passed``). Raises KeyError as
    :func:`gate_checks`, and ValueError when the metrics hold no class."""
    checks = gate_checks(metrics, settings)
    accuracy, recalls = checks[0], checks[1:]
    labels = list(metrics["per_class"])
    lowest = min(range(len(recalls)), key=lambda i: recalls[i].value)
    shown = [
        {"metric": "accuracy", **_check_figures(accuracy)},
        {
            "metric": "lowest class recall",
            "class": labels[lowest],
            **_check_figures(recalls[lowest]),
        },
    ]
    return {
        "min_accuracy": settings.min_accuracy,
        "min_class_recall": settings.min_class_recall,
        "passed": all(check.passed for check in checks),
        "checks": shown,
    }


def _check_figures(check: GateCheck) -> dict[str, Any]:
    return {
        "value": check.value,
        "threshold": check.threshold,
        "param": check.param,
        "passed": check.passed,
    }


def read_json(path: Path) -> Any:
    """The JSON file at ``path``, parsed. Raises OSError when it cannot be read and ValueError
    when it is not JSON."""
    return json.loads(path.read_text(encoding="utf-8"))


def data_summary(ingest_metrics: dict[str, Any], split_metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's data section from the ingest and split stages' metrics, roles in pipeline
    order (pretrain, target): files verified per role (``files``), accepted images per role
    (total and per class), images per role, split and class (splits in the order train, val,
    test), rejected files per role and reason (reasons with none left out; duplicates are not
    rejections), duplicates per role (``duplicates``: second copies of an accepted file, kept
    once) and the split's near-duplicate findings (None when the split metrics predate them).
    Raises nothing for missing counts."""
    ingested = {role: ingest_metrics[role] for role in ROLES if role in ingest_metrics}
    rejected = {
        role: {
            verdict: count
            for verdict, count in counts.get("verdicts", {}).items()
            if verdict not in ("accepted", "duplicate") and count
        }
        for role, counts in ingested.items()
    }
    duplicates = {
        role: counts.get("verdicts", {}).get("duplicate", 0) for role, counts in ingested.items()
    }
    accepted = {
        role: {"total": counts.get("accepted"), "classes": counts.get("accepted_per_class", {})}
        for role, counts in ingested.items()
    }
    splits = {
        role: {
            split: split_metrics[role][split]
            for split in sorted(split_metrics[role], key=_split_order)
        }
        for role in ROLES
        if role in split_metrics
    }
    return {
        "files": {role: counts.get("files") for role, counts in ingested.items()},
        "accepted": accepted,
        "splits": splits,
        "rejected": rejected,
        "duplicates": duplicates,
        "near_duplicates": split_metrics.get("near_duplicates"),
    }


def _split_order(split: str) -> tuple[int, str]:
    """Train, val, test, then anything else by name."""
    return (SPLITS.index(split), "") if split in SPLITS else (len(SPLITS), split)


def phase_epochs(history: Path) -> dict[str, int]:
    """Epochs run per phase of a training stage's ``history`` CSV (its ``phase`` column), in
    the order the phases ran: ``{"head": 15, "unfreeze": 20}``. Raises OSError when the file
    cannot be read and KeyError when it has no ``phase`` column."""
    epochs: dict[str, int] = {}
    with history.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            epochs[row["phase"]] = epochs.get(row["phase"], 0) + 1
    return epochs


def training_device(metrics: dict[str, Any]) -> dict[str, str]:
    """The device a training stage recorded in its ``metrics`` (``device``, and
    ``device_name`` for CUDA); empty when it recorded none (trained nothing, or predates the
    record)."""
    return {key: metrics[key] for key in ("device", "device_name") if key in metrics}


def backbone_training(
    backbone_epoch: int, backbone_classes: list[str], splits: dict[str, Any]
) -> dict[str, Any] | None:
    """What the backbone was trained on here: the pretraining corpus (role ``pretrain``), its
    number of classes and its images per split (``splits`` is :func:`data_summary`'s), and
    the best epoch kept. None when ``backbone_epoch`` is 0: the pretrain stage passed its
    starting weights through untrained."""
    if backbone_epoch == 0:
        return None
    return {
        "role": "pretrain",
        "classes": len(backbone_classes),
        "images": {split: counts["total"] for split, counts in splits.get("pretrain", {}).items()},
        "best_epoch": backbone_epoch,
    }


def used_params(params: Params) -> dict[str, Any]:
    """Every param the pipeline's result depends on (the register stage declares them all),
    as JSON-ready dicts per section; not ingest.workers nor register.max_drop_vs_prod."""
    dump = {
        # common.distributed only when set: a one-process card stays as it was.
        "common": params.common.model_dump(mode="json", exclude_none=True),
        "ingest": params.ingest.model_dump(mode="json", exclude={"workers"}),
        "split": params.split.model_dump(mode="json"),
        "pretrain": params.pretrain.model_dump(mode="json"),
        "finetune": params.finetune.model_dump(mode="json"),
        "evaluate": params.evaluate.model_dump(mode="json"),
        "register": params.registry.model_dump(mode="json", include=set(GATE_KEYS)),
    }
    return dump


def model_card(params: Params, metrics: dict[str, Any]) -> dict[str, Any]:
    """The model card: everything a user of the model needs, and the hashes of what produced
    it, from ``params`` and the test ``metrics`` (which must pass the gate). Reads the
    checkpoints and reports the params' paths name; raises CheckpointError when a checkpoint
    is missing or not graft's, and OSError when a report is missing."""
    paths = params.paths
    _, meta = load_checkpoint(paths.finetune.checkpoint)
    _, backbone = load_checkpoint(paths.pretrain.checkpoint)
    pretrained_sha256 = file_sha256(paths.pretrain.checkpoint)
    data = data_summary(read_json(paths.ingest.metrics), read_json(paths.split.metrics))
    stages = {"pretrain": paths.pretrain, "finetune": paths.finetune, "baseline": paths.baseline}
    return {
        "name": params.registry.name,
        "architecture": meta.arch,
        "classes": meta.classes,
        "input": {
            "image_size": meta.image_size,
            "channels": "RGB",
            "resize": "whole image resized to a square, bilinear",
            "scale": "pixel values / 255",
            "mean": meta.mean,
            "std": meta.std,
        },
        # The torch.export program in the package: how to feed it without graft.
        "export": export.card_section(meta.image_size),
        "metrics": metrics,
        "gate": gate_record(metrics, params.registry),
        "training": {
            "init": meta.init,
            # The checkpoint the finetune stage kept: its epoch and phase (graft.training).
            "best_epoch": meta.epoch,
            "best_phase": meta.extra.get("best_phase"),
            "epochs": phase_epochs(paths.finetune.history),
            "validation": meta.metrics,
            "extra": meta.extra,
            "seed": params.common.seed,
            "device_setting": params.common.device,
            # What each training stage ran on; "auto" above does not say.
            "device": {
                stage: training_device(read_json(out.metrics)) for stage, out in stages.items()
            },
        },
        # Where the starting weights came from: the backbone checkpoint's own record
        # (scratch, imagenet:<weights>, ...) and any provenance it carries, kept whole.
        "weights_provenance": {
            "finetuned_from": {"sha256": pretrained_sha256, "init": meta.init},
            "backbone": {
                "arch": backbone.arch,
                "classes": backbone.classes,
                "init": backbone.init,
                "extra": backbone.extra,
                "trained_on": backbone_training(backbone.epoch, backbone.classes, data["splits"]),
            },
        },
        "data": data,
        "params": used_params(params),
        "inputs_sha256": {
            "manifest": file_sha256(manifest_path(paths.ingest.dataset)),
            "splits": file_sha256(paths.split.splits),
            "pretrained_weights": pretrained_sha256,
            "weights": file_sha256(paths.finetune.checkpoint),
        },
    }


def register(params: Params) -> dict[str, Any]:
    """Gate on the evaluation metrics, then write the package (weights, exported program and
    model card) atomically to ``paths.register.package``. Returns the card. Raises GateError,
    naming each metric that missed its threshold, without writing anything; CheckpointError
    when a checkpoint is missing, not graft's or its weights do not fit its architecture,
    OSError when a report is missing, and torch's errors when the network cannot be exported
    (nothing is written then either)."""
    metrics = read_json(params.paths.evaluate.metrics)
    failures = gate_failures(metrics, params.registry)
    if failures:
        raise GateError("model not registered, gate failed:\n  " + "\n  ".join(failures))
    card = model_card(params, metrics)
    with atomic.atomic_path(params.paths.registry.package, directory=True) as package:
        shutil.copyfile(params.paths.finetune.checkpoint, package / WEIGHTS)
        # Exported from the copy, so graft.json's sha256 is that of the package's model.pt.
        (package / PROGRAM).write_bytes(export.export_program(package / WEIGHTS))
        (package / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        (package / CARD_MARKDOWN).write_text(render_markdown(card), encoding="utf-8")
    return card
