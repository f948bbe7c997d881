"""What pretraining buys: the finetune recipe from the pretrained backbone vs from scratch.

Runs on the workspace's pipeline outputs (run ``dvc repro`` first): the same target splits,
the same finetune params, once starting from ``paths.pretrain.checkpoint`` and once from random
weights. Prints a table and, last, one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tasks import schemas
from tasks.config import load_params
from tasks.evaluate import evaluate
from tasks.finetune import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    arguments = parser.parse_args()
    params = load_params(arguments.params)
    splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
    dataset = params.paths.ingest.dataset
    figures: dict[str, float] = {}
    for name, backbone in (("pretrained", params.paths.pretrain.checkpoint), ("scratch", None)):
        started = time.perf_counter()
        trained = finetune(
            splits,
            dataset,
            params.finetune,
            params.common,
            backbone=backbone,
            arch=params.pretrain.arch,
        )
        _, metrics = evaluate(
            trained.model,
            trained.meta,
            splits,
            dataset,
            params.common,
            batch_size=params.evaluate.batch_size,
        )
        figures[f"{name}_accuracy"] = float(metrics["accuracy"])  # type: ignore[arg-type]
        figures[f"{name}_macro_f1"] = float(metrics["macro_f1"])  # type: ignore[arg-type]
        figures[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
    figures["transfer_gain"] = figures["pretrained_accuracy"] - figures["scratch_accuracy"]
    train_images = int((splits.query("role == 'target' and split == 'train'")).shape[0])
    print(f"\ntarget train images: {train_images}")
    print(f"{'start':<12}{'accuracy':>10}{'macro F1':>10}{'seconds':>9}")
    for name in ("pretrained", "scratch"):
        print(
            f"{name:<12}{figures[name + '_accuracy']:>10.4f}{figures[name + '_macro_f1']:>10.4f}"
            f"{figures[name + '_seconds']:>9.1f}"
        )
    print(f"transfer gain (accuracy): {figures['transfer_gain']:+.4f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
