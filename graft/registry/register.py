"""Stage ``register``: gate the model on its test metrics and package it with a model card.

The package (``paths.register.package``) holds ``model.pt`` (the fine-tuned checkpoint, loadable
with ``torch.load(weights_only=True)``), ``model_card.json`` and ``model_card.md``. When the gate
fails the stage fails, naming each metric that missed its threshold, and writes nothing.

The card holds only what this stage's declared deps and params determine, so ``dvc repro`` on a
fresh clone reproduces it byte for byte. The code commit, the dirty flag, the environment and the
comparison with the production version depend on git state and the machine: ``graft publish``
records them in the version's git tag instead (see graft/registry/publish.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graft import atomic
from graft.config.params import ROLES, Params, Register
from graft.data.layout import manifest_path
from graft.errors import GraftError
from graft.hashing import file_sha256
from graft.registry.package_layout import CARD_JSON, CARD_MARKDOWN, WEIGHTS
from graft.training.checkpoints import load_checkpoint

# The register params the stage uses (dvc.yaml lists the same keys); max_drop_vs_prod is
# publish's, so changing it must not re-run the stage.
GATE_KEYS = ("name", "min_accuracy", "min_class_recall")


class GateError(GraftError):
    """The model's metrics do not meet the thresholds in params (register.*)."""


def gate_failures(metrics: dict[str, Any], settings: Register) -> list[str]:
    """Why a model with these test ``metrics`` (accuracy and per-class recall, 0-1) may not be
    registered under the thresholds ``settings``; empty when it passes. Raises KeyError when
    ``metrics`` lacks accuracy, per_class or a class's recall."""
    failures = []
    if metrics["accuracy"] < settings.min_accuracy:
        failures.append(
            f"accuracy {metrics['accuracy']:.4f} < register.min_accuracy {settings.min_accuracy}"
        )
    for label, scores in metrics["per_class"].items():
        if scores["recall"] < settings.min_class_recall:
            failures.append(
                f"recall of class {label!r} {scores['recall']:.4f} < "
                f"register.min_class_recall {settings.min_class_recall}"
            )
    return failures


def read_json(path: Path) -> Any:
    """The JSON file at ``path``, parsed. Raises OSError when it cannot be read and ValueError
    when it is not JSON."""
    return json.loads(path.read_text(encoding="utf-8"))


def data_summary(ingest_metrics: dict[str, Any], split_metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's data section from the ingest and split stages' metrics: accepted images per
    role (total and per class), images per role, split and class, rejected files per role
    and reason (reasons with none left out), and the split's near-duplicate findings (None
    when the split metrics predate them). Raises nothing for missing counts."""
    rejected = {
        role: {
            verdict: count
            for verdict, count in counts.get("verdicts", {}).items()
            if verdict != "accepted" and count
        }
        for role, counts in ingest_metrics.items()
    }
    accepted = {
        role: {"total": counts.get("accepted"), "classes": counts.get("accepted_per_class", {})}
        for role, counts in ingest_metrics.items()
    }
    splits = {role: counts for role, counts in split_metrics.items() if role in ROLES}
    return {
        "accepted": accepted,
        "splits": splits,
        "rejected": rejected,
        "near_duplicates": split_metrics.get("near_duplicates"),
    }


def _near_duplicate_lines(card: dict[str, Any]) -> list[str]:
    """The card's near-duplicate findings for people; none for a card without them."""
    found = card["data"].get("near_duplicates")
    if not found:
        return []
    rule = card["params"]["split"]["near_duplicates"]
    overlap = found["pretrain_overlap"]
    fate = (
        f"{overlap['excluded']} excluded from the target splits"
        if rule["pretrain_overlap"] == "exclude"
        else "kept in the target splits (`split.near_duplicates.pretrain_overlap: report`)"
    )
    lines = [
        f"- Target images also in the pretraining corpus (identical or within "
        f"{rule['max_distance']} bits): {overlap['images']}, {fate}"
    ]
    for role in ROLES:
        role_found = found[role]
        lines.append(
            f"- Near-duplicate groups ({role}): {role_found['groups']} "
            f"({role_found['images']} images), {role_found['label_conflicts']} under two "
            "or more labels"
        )
    return lines


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
    it, from ``params`` and the test ``metrics``. Reads the checkpoints and reports the
    params' paths name; raises CheckpointError when a checkpoint is missing or not graft's, and
    OSError when a report is missing."""
    paths = params.paths
    _, meta = load_checkpoint(paths.finetune.checkpoint)
    _, backbone = load_checkpoint(paths.pretrain.checkpoint)
    pretrained_sha256 = file_sha256(paths.pretrain.checkpoint)
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
        "metrics": metrics,
        "gate": {
            "min_accuracy": params.registry.min_accuracy,
            "min_class_recall": params.registry.min_class_recall,
            "passed": True,
        },
        "training": {
            "init": meta.init,
            "best_epoch": meta.epoch,
            "best_phase": meta.extra.get("best_phase"),
            "validation": meta.metrics,
            "extra": meta.extra,
            "seed": params.common.seed,
            "device_setting": params.common.device,
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
            },
        },
        "data": data_summary(read_json(paths.ingest.metrics), read_json(paths.split.metrics)),
        "params": used_params(params),
        "inputs_sha256": {
            "manifest": file_sha256(manifest_path(paths.ingest.dataset)),
            "splits": file_sha256(paths.split.splits),
            "pretrained_weights": pretrained_sha256,
            "weights": file_sha256(paths.finetune.checkpoint),
        },
    }


def _counts_table(card: dict[str, Any]) -> list[str]:
    lines = ["| role | split | images | per class |", "| --- | --- | --- | --- |"]
    for role, splits in card["data"]["splits"].items():
        for split, counts in splits.items():
            classes = ", ".join(f"{k}: {v}" for k, v in counts["classes"].items())
            lines.append(f"| {role} | {split} | {counts['total']} | {classes} |")
    return lines


def render_markdown(card: dict[str, Any]) -> str:
    """The model card ``card`` (as :func:`model_card` makes it) as Markdown for people.
    Raises KeyError when the card lacks a section it shows."""
    metrics = card["metrics"]
    provenance = card["weights_provenance"]["backbone"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"- Architecture: `{card['architecture']}`, fine-tuned from `{card['training']['init']}`",
        f"- Backbone weights: `{provenance['init']}` ({provenance['arch']}, "
        f"trained on {len(provenance['classes'])} classes)",
        f"- Classes ({len(card['classes'])}): {', '.join(card['classes'])}",
        f"- Input: {card['input']['image_size']} px RGB, mean {card['input']['mean']}, "
        f"std {card['input']['std']}",
        f"- Test accuracy: {metrics['accuracy']:.4f}, macro F1: {metrics['macro_f1']:.4f} "
        f"({metrics['test_images']} images)",
        f"- Seed: {card['training']['seed']}, device setting: {card['training']['device_setting']}",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, scores in metrics["per_class"].items():
        lines.append(
            f"| {label} | {scores['precision']:.3f} | {scores['recall']:.3f} | "
            f"{scores['f1']:.3f} | {scores['support']} |"
        )
    lines += ["", "## Data", "", *_counts_table(card), ""]
    for role, reasons in card["data"]["rejected"].items():
        listed = ", ".join(f"{reason}: {n}" for reason, n in reasons.items()) or "none"
        lines.append(f"- Rejected ({role}): {listed}")
    lines += _near_duplicate_lines(card)
    lines += ["", "## Inputs (sha256)", ""]
    lines += [f"- {name}: `{digest}`" for name, digest in card["inputs_sha256"].items()]
    lines += [
        "",
        "Code commit, dirty flag and environment are recorded when a version is published "
        "(`graft lineage show <name>@<version>`).",
    ]
    return "\n".join(lines) + "\n"


def register(params: Params) -> dict[str, Any]:
    """Gate on the evaluation metrics, then write the package (weights and model card)
    atomically to ``paths.register.package``. Returns the card. Raises GateError, naming each
    metric that missed its threshold, without writing anything; CheckpointError when a
    checkpoint is missing or not graft's, OSError when a report is missing."""
    metrics = read_json(params.paths.evaluate.metrics)
    failures = gate_failures(metrics, params.registry)
    if failures:
        raise GateError("model not registered, gate failed:\n  " + "\n  ".join(failures))
    card = model_card(params, metrics)
    with atomic.atomic_path(params.paths.registry.package, directory=True) as package:
        shutil.copyfile(params.paths.finetune.checkpoint, package / WEIGHTS)
        (package / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        (package / CARD_MARKDOWN).write_text(render_markdown(card), encoding="utf-8")
    return card
