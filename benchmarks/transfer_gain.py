"""What pretraining buys: the finetune recipe from the pretrained backbone vs from random weights.

Uses the workspace's pipeline outputs (run ``dvc repro`` first): the ingested dataset, the
pretrained checkpoint and the finetune params. For each seed it re-splits the target source
with that seed, fine-tunes twice with the same recipe (once from ``paths.pretrain.checkpoint``,
once from random weights) and scores both on the test split. Few-shot results swing with the
draw of the training images, so several seeds are the default. ``--set`` tries another
finetune recipe without editing params.yaml. Prints a table and, last, one JSON line with the
figures.

    python benchmarks/transfer_gain.py --seeds 1 2 3 --train-fraction 0.06
    python benchmarks/transfer_gain.py --set finetune.unfreeze.blocks=all \\
        --set finetune.unfreeze.lr=1e-4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from graft.config.params import Fractions, parse_params
from graft.config.yaml12 import parse_yaml
from graft.data.layout import read_manifest
from graft.data.split import make_splits
from graft.errors import run_main
from graft.evaluation.evaluate import classification_metrics, predict_test_split
from graft.training.determinism import use_deterministic_kernels
from graft.training.finetune import finetune

STARTS = ("pretrained", "scratch")


def with_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``raw`` params with each ``finetune.KEY.PATH=VALUE`` applied (VALUE read as YAML)."""
    for assignment in assignments:
        dotted, separator, value = assignment.partition("=")
        keys = dotted.split(".")
        if not separator or keys[0] != "finetune" or len(keys) < 2:
            # The pretrained checkpoint is the workspace's: only the finetune recipe can vary.
            raise SystemExit(f"--set {assignment!r}: expected finetune.<key>=<value>")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = parse_yaml(value)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--train-fraction",
        type=float,
        help="override split.target.train (val kept, test takes the rest)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="finetune.KEY=VALUE",
        help="override a finetune param for this run (repeatable)",
    )
    arguments = parser.parse_args()
    use_deterministic_kernels()  # as the stage entry points do
    raw = parse_yaml(arguments.params.read_text(encoding="utf-8"))  # as DVC reads it
    params = parse_params(with_overrides(raw, arguments.set), str(arguments.params))
    split_settings = params.split
    if arguments.train_fraction is not None:
        val = split_settings.target.val
        target = Fractions(
            train=arguments.train_fraction, val=val, test=1 - val - arguments.train_fraction
        )
        split_settings = split_settings.model_copy(update={"target": target})
    manifest = read_manifest(params.paths.ingest.dataset)
    dataset = params.paths.ingest.dataset
    accuracy: dict[str, list[float]] = {start: [] for start in STARTS}
    seconds: dict[str, float] = dict.fromkeys(STARTS, 0.0)
    train_images = 0
    for seed in arguments.seeds:
        common = params.common.model_copy(update={"seed": seed})
        splits = make_splits(manifest, split_settings, seed)
        train_images = int(((splits["role"] == "target") & (splits["split"] == "train")).sum())
        for start in STARTS:
            started = time.perf_counter()
            backbone = params.paths.pretrain.checkpoint if start == "pretrained" else None
            trained = finetune(
                splits, dataset, params.finetune, common,
                backbone=backbone, arch=params.pretrain.arch,
            )  # fmt: skip
            test = predict_test_split(
                trained.model, trained.meta, splits, dataset, common,
                batch_size=params.evaluate.batch_size,
            )  # fmt: skip
            metrics = classification_metrics(test.table, test.classes)
            accuracy[start].append(float(metrics["accuracy"]))  # type: ignore[arg-type]
            seconds[start] += time.perf_counter() - started
            print(f"seed {seed} {start}: test accuracy {accuracy[start][-1]:.4f}", flush=True)

    figures: dict[str, object] = {"seeds": arguments.seeds, "target_train_images": train_images}
    figures["overrides"] = arguments.set
    print(f"\ntarget train images: {train_images} (seeds {arguments.seeds})")
    print(f"{'start':<12}{'mean acc':>10}{'min':>8}{'max':>8}{'seconds':>9}")
    for start in STARTS:
        values = accuracy[start]
        figures[f"{start}_accuracy_mean"] = statistics.fmean(values)
        figures[f"{start}_accuracies"] = values
        print(
            f"{start:<12}{statistics.fmean(values):>10.4f}{min(values):>8.4f}"
            f"{max(values):>8.4f}{seconds[start]:>9.1f}"
        )
    gains = [p - s for p, s in zip(accuracy["pretrained"], accuracy["scratch"], strict=True)]
    figures["transfer_gain_mean"] = statistics.fmean(gains)
    # Seeds pair the two starts on the same split, so the paired differences are the evidence:
    # a gain is measurable when it stands clear of its standard error.
    error = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    wins = sum(gain > 0 for gain in gains)
    figures.update(transfer_gain_standard_error=error, pretrained_wins=wins)
    print(
        f"transfer gain (accuracy, mean over seeds): {statistics.fmean(gains):+.4f} "
        f"(standard error {error:.4f}; pretrained ahead on {wins} of {len(gains)} seeds)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    run_main(main)
