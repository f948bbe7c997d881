"""The model card for people: ``model_card.md``, rendered from the card's facts alone.

graft.registry.register gathers the facts (``model_card.json``); this module only words them,
so the two files never disagree. The result comes first (test metrics, transfer gain), then
how the model was made (backbone, fine-tuning, device), the gate it passed, per-class scores,
the data, how to use the exported program without graft, and the hashes of the inputs.
"""

from __future__ import annotations

from typing import Any

from graft.config.settings import ROLES

PHASES = {"head": "backbone frozen", "unfreeze": "deepest backbone blocks unfrozen"}
LISTED_CLASSES = 12  # class names listed before "and N more": ImageNet has 1,000
SNIPPET_IMAGE = "image.jpg"  # the image file the card's "Use it without graft" code classifies


def render_markdown(card: dict[str, Any]) -> str:
    """The model card ``card`` (as graft.registry.register.model_card makes it) as Markdown
    for people. Raises KeyError when the card lacks a section it shows."""
    metrics = card["metrics"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"**Test accuracy {metrics['accuracy']:.4f}** on {metrics['test_images']} target test "
        f"images; balanced accuracy {metrics['balanced_accuracy']:.4f}, macro F1 "
        f"{metrics['macro_f1']:.4f}, expected calibration error (ECE) {metrics['ece']:.4f}.",
        "",
        *transfer_gain_lines(metrics.get("transfer_gain")),
        f"- Architecture: `{card['architecture']}`; classes ({len(card['classes'])}): "
        f"{_names(card['classes'])}",
        f"- Input: {card['input']['image_size']} px RGB, mean {card['input']['mean']}, "
        f"std {card['input']['std']}",
        f"- Backbone: {backbone_text(card)}",
        f"- Fine-tuning: {best_epoch_text(card['training'])}",
        f"- Device: {device_text(card['training'])}",
        f"- Seed: {card['training']['seed']}",
        "",
        *gate_lines(card["gate"]),
        "",
        "## Test metrics per class",
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
    lines += ingest_lines(card["data"])
    lines += _near_duplicate_lines(card)
    lines += export_lines(card.get("export"))
    lines += ["", "## Inputs (sha256)", ""]
    lines += [f"- {name}: `{digest}`" for name, digest in card["inputs_sha256"].items()]
    lines += [
        "",
        "Code commit, dirty flag and environment are recorded when a version is published "
        "(`graft lineage show <name>@<version>`).",
    ]
    return "\n".join(lines) + "\n"


def export_lines(export: dict[str, Any] | None) -> list[str]:
    """The "Use it without graft" section, after a blank line: the exported program's file,
    input and output (``export`` is the card's section), and Python code that loads it with
    torch alone and classifies the image file ``image.jpg`` (:data:`SNIPPET_IMAGE`), run in
    the package's folder; none for a card without an export (made before there was one)."""
    if export is None:
        return []
    size = export["input"]["image_size"]
    program, metadata = export["file"], export["metadata"]
    return [
        "",
        "## Use it without graft",
        "",
        f"`{program}` is the model with its preprocessing as a `{export['format']}` program "
        f"that needs only torch: input {export['input']['layout']} (here S = {size}); output "
        f"{export['output']}. `{metadata}` inside it holds the classes, image size, mean, std "
        "and the sha256 of the `model.pt` it was exported from. In the package's folder, with "
        "torch, numpy and Pillow:",
        "",
        "```python",
        "import json, numpy as np, torch; from PIL import Image, ImageOps",
        f'extra = {{"{metadata}": ""}}; model = torch.export.load("{program}", '
        f'extra_files=extra).module(); meta = json.loads(extra["{metadata}"])',
        f'image = ImageOps.exif_transpose(Image.open("{SNIPPET_IMAGE}")).convert("RGB")'
        '.resize((meta["image_size"],) * 2, Image.Resampling.BILINEAR)',
        "with torch.no_grad(): probabilities = model(torch.from_numpy(np.array(image))[None])[0]"
        '; print(meta["classes"][int(probabilities.argmax())], float(probabilities.max()))',
        "```",
        "",
        "`graft predict` applies graft's full verification and its exact decoding (alpha "
        "composited on black, high-bit-depth images stretched to full contrast), which this "
        "snippet does not.",
    ]


def transfer_gain_lines(gain: dict[str, float] | None) -> list[str]:
    """The transfer gain in plain words, its sign stated (``gain`` is the evaluate stage's
    ``transfer_gain``: test accuracy and macro F1 from the pretrained backbone and from random
    weights, and their differences, 0-1), as a paragraph and a blank line; a line saying it
    was not measured when ``gain`` is None (metrics from before the baseline stage)."""
    if gain is None:
        return ["Transfer gain: not measured (no baseline in these metrics).", ""]
    points = round(gain["gain"] * 100, 1)
    if points > 0:
        verdict = f"pretraining helped: +{points:.1f} points of test accuracy"
    elif points < 0:
        verdict = f"pretraining hurt: {points:.1f} points of test accuracy"
    else:
        verdict = "pretraining made no difference: 0.0 points of test accuracy"
    return [
        f"**Transfer gain: {verdict}** ({gain['pretrained_accuracy']:.4f} fine-tuned from the "
        f"pretrained backbone, {gain['scratch_accuracy']:.4f} for the same recipe from random "
        f"weights, stage `baseline`; macro F1 {gain['macro_f1_gain'] * 100:+.1f} points).",
        "",
    ]


def backbone_text(card: dict[str, Any]) -> str:
    """What the backbone is and what it was pretrained on: the corpus's classes and images
    when the pretrain stage trained it, else the starting weights it passed through."""
    backbone = card["weights_provenance"]["backbone"]
    start = _init_text(backbone["init"])
    digest = card["weights_provenance"]["finetuned_from"]["sha256"]
    trained = backbone.get("trained_on")
    if trained is None:
        what = (
            "random weights, not pretrained (`pretrain.epochs: 0`)"
            if backbone["init"] == "scratch"
            else f"{start}, not trained further here"
        )
        return f"`{backbone['arch']}`, {what}; sha256 `{digest[:12]}`"
    images = " and ".join(f"{n} {split}" for split, n in trained["images"].items())
    return (
        f"`{backbone['arch']}` pretrained here from {start} on the `{trained['role']}` "
        f"source: {trained['classes']} classes ({_names(backbone['classes'])}), {images} "
        f"images; best epoch {trained['best_epoch']}; sha256 `{digest[:12]}`"
    )


def _init_text(init: str) -> str:
    """A checkpoint's ``init`` record (graft.training.weights) in words."""
    if init == "scratch":
        return "random weights"
    kind, _, detail = init.partition(":")
    if kind == "imagenet":
        return f"ImageNet weights `{detail}`"
    if kind == "checkpoint":
        return f"the checkpoint with sha256 `{detail[:12]}`"
    return f"`{init}`"


def best_epoch_text(training: dict[str, Any]) -> str:
    """The fine-tune's kept epoch and its phase, with the epochs each phase ran and the kept
    epoch's validation accuracy (``training`` is the card's section)."""
    epochs: dict[str, int] = training.get("epochs") or {}
    phase = training.get("best_phase")
    text = f"best epoch {training['best_epoch']}"
    if epochs:
        text += f" of {sum(epochs.values())}"
    if phase:
        text += f", in the `{phase}` phase"
        if phase in PHASES:
            text += f" ({PHASES[phase]})"
    ranges, first = [], 1
    for name, count in epochs.items():
        ranges.append(f"`{name}` epochs {first}-{first + count - 1}")
        first += count
    if ranges:
        text += f"; {', '.join(ranges)}"
    accuracy = training.get("validation", {}).get("val_accuracy")
    if accuracy is not None:
        text += f"; validation accuracy {accuracy:.4f}"
    return text


def device_text(training: dict[str, Any]) -> str:
    """Where each training stage ran, stages on the same device grouped, and the
    ``common.device`` setting that chose it."""
    by_device: dict[str, list[str]] = {}
    for stage, record in (training.get("device") or {}).items():
        name = record.get("device", "not recorded")
        if "device_name" in record:
            name += f", {record['device_name']}"
        by_device.setdefault(name, []).append(stage)
    used = "; ".join(f"{name} ({', '.join(stages)})" for name, stages in by_device.items())
    return f"{used or 'not recorded'}; setting `common.device: {training['device_setting']}`"


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """The gate as a heading and a table: each threshold, its params key, the measured value
    and whether it passed (``gate`` is the card's section)."""
    result = "passed" if gate["passed"] else "failed"
    lines = [
        f"## Gate: {result}",
        "",
        "| check | threshold | measured | result |",
        "| --- | --- | --- | --- |",
    ]
    for check in gate.get("checks", []):
        metric = {"accuracy": "test accuracy"}.get(check["metric"], check["metric"])
        if "class" in check:
            metric += f" (class {check['class']})"
        lines.append(
            f"| {metric} | {check['threshold']} (`{check['param']}`) | {check['value']:.4f} | "
            f"{'passed' if check['passed'] else 'failed'} |"
        )
    lines += [
        "",
        "Every class's test recall must reach `register.min_class_recall`: the lowest is shown. "
        "A model that fails the gate gets no card.",
    ]
    return lines


def ingest_lines(data: dict[str, Any]) -> list[str]:
    """Per role: files verified, accepted, rejected by reason, and duplicates apart (a second
    copy of an accepted file is skipped, not an error)."""
    lines = []
    files = data.get("files", {})
    duplicates = data.get("duplicates", {})
    for role, accepted in data["accepted"].items():
        reasons = data["rejected"].get(role, {})
        rejected = sum(reasons.values())
        listed = ", ".join(f"{reason}: {n}" for reason, n in reasons.items())
        seen = f"{files[role]} files: " if files.get(role) is not None else ""
        why = f" ({listed})" if listed else ""
        lines.append(
            f"- Ingest ({role}): {seen}{accepted['total']} accepted, "
            f"{_plural(rejected, 'file')} rejected{why}, "
            f"{_duplicates(duplicates.get(role, 0))}"
        )
    return lines


def _counts_table(card: dict[str, Any]) -> list[str]:
    lines = ["| role | split | images | per class |", "| --- | --- | --- | --- |"]
    for role, splits in card["data"]["splits"].items():
        for split, counts in splits.items():
            classes = ", ".join(f"{k}: {v}" for k, v in counts["classes"].items())
            lines.append(f"| {role} | {split} | {counts['total']} | {classes} |")
    return lines


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


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_CLASSES])
    more = len(names) - LISTED_CLASSES
    return f"{shown} and {more} more" if more > 0 else shown


def _duplicates(count: int) -> str:
    """How many duplicates were skipped, saying that each was kept once when there are any."""
    return _plural(count, "duplicate") + (" skipped (kept once)" if count else " skipped")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
