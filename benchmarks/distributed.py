"""Data-parallel training: one process against several, on the demo, through the real stages.

Copies the pipeline into a temporary folder, ingests and splits the demo there with graft's
own stages, then for every seed and world size runs ``python -m tasks.pretrain`` and
``python -m tasks.finetune`` exactly as ``dvc repro`` would, with ``common.distributed`` set
(world size 1 leaves it out: the one-process path). From rank 0's log it reads the wall time of
every pretrain epoch (training and validation) and the training images, and scores the
fine-tuned checkpoint on the test split with graft's evaluation code.

On the CPU the world sizes are 1 and 2 (gloo; each of N processes gets cores / N threads, so
both sides use the same cores and the best possible speed-up is the core count's, at most 2x
on a 2-core machine). On a CUDA machine they are 1 and every GPU (NCCL), unless
``--world-sizes`` says otherwise. Prints a table; the last line is one JSON object with
``world_sizes``, ``img_s`` and ``epoch_s`` per world size, ``scaling_efficiency``
(img/s at the largest world size / (its size x img/s of one process)), ``accuracy`` per world
size (mean test accuracy over the seeds, with every seed's), and ``device``.

    python benchmarks/distributed.py                 # demo, seeds 0 1 2 (minutes on a CPU)
    python benchmarks/distributed.py --quick         # a smoke run: 2 epochs, one seed
    python benchmarks/distributed.py --world-sizes 1 2 4 --seeds 0 1 2 3 4
    python benchmarks/distributed.py --image-size 96 --pretrain-epochs 3 --speed-only

``--speed-only`` skips finetune and the accuracy (``accuracy`` is then empty).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graft.config.params import parse_params  # noqa: E402
from graft.data import schemas  # noqa: E402
from graft.evaluation.evaluate import classification_metrics, predict_test_split  # noqa: E402
from graft.training.checkpoints import model_from_checkpoint  # noqa: E402

EPOCH = re.compile(r"^pretrain epoch \d+: .*\((\d+\.\d+)s\)$", re.M)
IMAGES = re.compile(r"^pretrain \S+ from \S+ on (\d+) images", re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="2 pretrain epochs, one seed")
    parser.add_argument("--image-size", type=int, help="common.image_size (the demo's: 32)")
    parser.add_argument("--pretrain-epochs", type=int, help="pretrain.epochs (the demo's: 12)")
    parser.add_argument("--speed-only", action="store_true", help="pretrain only, no accuracy")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    world_sizes = args.world_sizes or [1, torch.cuda.device_count() if cuda else 2]
    seeds = args.seeds[:1] if args.quick else args.seeds
    cores = len(os.sched_getaffinity(0))
    device = torch.cuda.get_device_name(0) if cuda else f"cpu ({cores} cores)"
    with tempfile.TemporaryDirectory(prefix="graft-distributed-") as folder:
        project = prepare(Path(folder), args)
        rows = [
            {"world_size": world, "seed": seed, **train(project, world, seed, args.speed_only)}
            for seed in seeds
            for world in world_sizes
        ]
    report(pd.DataFrame(rows), world_sizes, device)


def prepare(folder: Path, args: argparse.Namespace) -> Path:
    """The pipeline and the demo's params in ``folder``, ingested and split."""
    for code in ("graft", "tasks"):
        shutil.copytree(ROOT / code, folder / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for role, source in params["ingest"]["sources"].items():
        source["uri"] = str(ROOT / "data" / "demo" / role)
    if args.quick:
        params["pretrain"]["epochs"] = 2
        params["finetune"]["head"]["epochs"] = params["finetune"]["unfreeze"]["epochs"] = 1
    if args.image_size:
        params["common"]["image_size"] = args.image_size
    if args.pretrain_epochs:
        params["pretrain"]["epochs"] = args.pretrain_epochs
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("scan", "ingest", "split"):
        stage_command(folder, stage)
    return folder


def stage_command(folder: Path, stage: str) -> str:
    """Run ``python -m tasks.<stage>`` in ``folder``; return what it printed to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"], cwd=folder, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-4000:]}")
    return done.stderr


def train(folder: Path, world: int, seed: int, speed_only: bool) -> dict[str, Any]:
    """Pretrain and finetune with ``world`` processes and ``common.seed`` = ``seed``; the
    pretrain epochs' speed and the fine-tuned model's test accuracy (not with
    ``speed_only``: pretrain alone)."""
    params_file = folder / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["common"]["seed"] = seed  # the split stays the one already made
    params["common"].pop("distributed", None)
    if world > 1:
        params["common"]["distributed"] = {"nproc_per_node": world, "nnodes": 1}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    log = stage_command(folder, "pretrain")
    if not speed_only:
        stage_command(folder, "finetune")
    epochs = [float(seconds) for seconds in EPOCH.findall(log)]
    images = int(IMAGES.search(log).group(1))  # type: ignore[union-attr]
    # The first epoch pays for warming up (allocations, the process group's first sums).
    epoch_s = statistics.median(epochs[1:] or epochs)
    return {
        "epochs": len(epochs),
        "epoch_s": epoch_s,
        "img_s": images / epoch_s,
        "test_accuracy": None if speed_only else test_accuracy(folder),
    }


def test_accuracy(folder: Path) -> float:
    """The fine-tuned checkpoint's accuracy on the target test split."""
    cwd = Path.cwd()
    os.chdir(folder)  # params' paths are relative to the project
    try:
        params = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
        splits = schemas.read_table(params.paths.split.splits, schemas.SPLITS_TABLE)
        model, meta = model_from_checkpoint(params.paths.finetune.checkpoint)
        test = predict_test_split(
            model, meta, splits, params.paths.ingest.dataset, params.common,
            batch_size=params.evaluate.batch_size, decoded=params.paths.decoded,
        )  # fmt: skip
        return float(classification_metrics(test.table, test.classes)["accuracy"])  # type: ignore[arg-type]
    finally:
        os.chdir(cwd)


def report(rows: pd.DataFrame, world_sizes: list[int], device: str) -> None:
    print(rows.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    per_world = rows.groupby("world_size")
    img_s = {int(str(w)): float(g["img_s"].median()) for w, g in per_world}
    epoch_s = {int(str(w)): float(g["epoch_s"].median()) for w, g in per_world}
    accuracy = {
        int(str(w)): {
            "mean": float(g["test_accuracy"].mean()),
            "seeds": g["test_accuracy"].tolist(),
        }
        for w, g in per_world
        if g["test_accuracy"].notna().all()
    }
    largest = max(world_sizes)
    efficiency = img_s[largest] / (largest * img_s[min(world_sizes)])
    print(
        json.dumps(
            {
                "world_sizes": world_sizes,
                "img_s": img_s,
                "epoch_s": epoch_s,
                "scaling_efficiency": round(efficiency, 3),
                "accuracy": accuracy,
                "device": device,
            }
        )
    )


if __name__ == "__main__":
    main()
