"""``graft predict`` against the plain loop people write by hand, on the same JPEGs and model.

Generates N JPEGs at the demo's size: scikit-learn's 8 x 8 digits (5-9, the demo's target
classes) scaled to 32 x 32 pixels (the demo model's input), with a little noise so no two
files are the same, saved as grey JPEGs at quality 90. Then, on one model:

- graft: :func:`graft.inference.predict.predict_files` end to end (every file read, hashed,
  verified as ingest does with a full decode under its memory and time budget in worker
  processes, decoded as training does, predicted in batches), rows written to a CSV file;
- the plain loop: load the checkpoint, then for each file open it with Pillow, EXIF-rotate,
  convert to RGB, resize, normalise, and run the network on that one image.

The model is the demo's registered package (``models/package`` after ``dvc repro``), or with
``--random`` (or when there is none) a resnet18 with random weights at the demo's settings.
Both time only the images (model loading is reported apart). ``agree`` is the fraction of
images both give the same class; ``max_abs_diff`` the largest difference of a probability.

Prints a table and, last, one JSON line: ``img_s``, ``baseline_img_s``, ``speedup``, ``agree``.

    python benchmarks/predict.py --n 10000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from graft.data.sources import SourceFile
from graft.inference.model_source import load_model
from graft.inference.predict import PredictOptions, gather_inputs, predict_files
from graft.inference.records import prediction_output
from graft.training.checkpoints import CheckpointMeta, model_from_checkpoint, save_checkpoint
from graft.training.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_PACKAGE = ROOT / "models" / "package"
SIZE = 32  # pixels: the demo's common.image_size
DIGITS = (5, 6, 7, 8, 9)  # the demo's target classes


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct grey SIZE x SIZE JPEGs of handwritten digits 5-9 under ``folder``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, DIGITS)
    images, labels = digits.images[keep], digits.target[keep]
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pick = index % len(images)
        small = Image.fromarray((images[pick] * (255 / 16)).astype(np.uint8))
        large = np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float64)
        noisy = np.clip(large + rng.normal(0, 6, large.shape), 0, 255).astype(np.uint8)
        path = folder / str(labels[pick]) / f"digit-{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def random_package(folder: Path) -> Path:
    """A graft checkpoint of a randomly initialised resnet18 at the demo's settings."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(DIGITS))
    meta = CheckpointMeta(
        "resnet18", [str(d) for d in DIGITS], SIZE, [0.5] * 3, [0.5] * 3, 0, {}, "scratch"
    )
    path = folder / "model.pt"
    save_checkpoint(path, model, meta)
    return path


def plain_loop(model_path: Path, files: list[Path]) -> tuple[float, float, list[list[float]]]:
    """The hand-written way: (load seconds, predict seconds, probabilities per file)."""
    started = time.perf_counter()
    model, meta = model_from_checkpoint(model_path)
    model.eval()
    mean = torch.tensor(meta.mean).view(3, 1, 1)
    std = torch.tensor(meta.std).view(3, 1, 1)
    loaded = time.perf_counter()
    rows = []
    with torch.no_grad():
        for path in files:
            with Image.open(path) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB")
                resized = rgb.resize((meta.image_size,) * 2, Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float()
            inputs = ((pixels / 255 - mean) / std).unsqueeze(0)
            rows.append(torch.softmax(model(inputs), dim=1)[0].tolist())
    return loaded - started, time.perf_counter() - loaded, rows


def graft_predict(
    model_ref: Path, files: list[SourceFile], out: Path, options: PredictOptions
) -> tuple[float, float, dict[str, list[float]]]:
    """graft's way: (load seconds, predict seconds, probabilities by path)."""
    started = time.perf_counter()
    model, source = load_model(ROOT, str(model_ref))
    loaded = time.perf_counter()
    with prediction_output(out, "csv", len(source.meta.classes), source) as writer:
        for row in predict_files(model, source, files, options):
            writer.write(row)
    elapsed = time.perf_counter() - loaded
    probabilities: dict[str, list[float]] = {}
    with out.open(newline="") as handle:
        for record in csv.DictReader(handle):
            by_class = {
                record[f"class_{rank}"]: float(record[f"probability_{rank}"])
                for rank in range(1, len(source.meta.classes) + 1)
            }
            probabilities[record["path"]] = [by_class[c] for c in source.meta.classes]
    return loaded - started, elapsed, probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="JPEGs to generate")
    parser.add_argument("--random", action="store_true", help="random weights, not the demo's")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-predict-bench-") as scratch:
        folder = Path(scratch)
        write_jpegs(folder / "images", arguments.n)
        use_demo = not arguments.random and (DEMO_PACKAGE / "model.pt").is_file()
        model_ref = DEMO_PACKAGE if use_demo else random_package(folder)
        options = PredictOptions(arguments.batch_size, 5, arguments.workers, "cpu")
        files = gather_inputs([folder / "images"]).files
        load_s, graft_s, ours = graft_predict(model_ref, files, folder / "out.csv", options)
        weights = model_ref / "model.pt" if model_ref.is_dir() else model_ref
        base_load_s, base_s, theirs = plain_loop(weights, [Path(f.path) for f in files])
    agree = [
        int(np.argmax(ours[f.relative]) == np.argmax(row))
        for f, row in zip(files, theirs, strict=True)
    ]
    diff = max(
        float(np.max(np.abs(np.array(ours[f.relative]) - np.array(row))))
        for f, row in zip(files, theirs, strict=True)
    )
    figures = {
        "images": len(files),
        "model": "demo package" if use_demo else "random resnet18",
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "img_s": round(len(files) / graft_s, 1),
        "baseline_img_s": round(len(files) / base_s, 1),
        "speedup": round(base_s / graft_s, 2),
        "agree": round(sum(agree) / len(agree), 6),
        "max_abs_diff": round(diff, 6),
        "graft_s": round(graft_s, 2),
        "baseline_s": round(base_s, 2),
        "graft_load_s": round(load_s, 2),
        "baseline_load_s": round(base_load_s, 2),
    }
    print(f"{'method':<34}{'seconds':>10}{'images/s':>12}")
    print(f"{'graft predict (verify + batches)':<34}{graft_s:>10.2f}{figures['img_s']:>12}")
    print(f"{'plain loop (image by image)':<34}{base_s:>10.2f}{figures['baseline_img_s']:>12}")
    print(f"speedup {figures['speedup']}x; same class for {figures['agree']:.2%} of images")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
