"""graft at scale: ingest, no-op ``dvc repro``, the decoded-image cache and the training data path.

Generates ``--n`` small JPEGs (96x96, two classes of the target source, one truncated, one
empty and one non-image file per 25,000) beside a small pretraining source, sets up a real git +
DVC project from this checkout with small training settings, and measures in one run:

- ``ingest_img_s``: a cold ``dvc repro ingest`` (scan + ingest), images per second;
- ``noop_repro_s``: ``dvc repro`` of the whole, already run pipeline when nothing changed (best
  of 3; only the scan stage runs);
- ``incremental_fraction``: ``dvc repro ingest`` after adding 1% new images, over the cold run;
  with the bytes of the shards that version added against the whole store's (what DVC stores
  and pushes per version);
- ``cache_build_img_s``: decoding every target image into the decoded cache at ``--size``;
- ``loader_img_s``: one epoch of shuffled, augmented batches from the cache (graft's loader);
- ``memory_loader_img_s``: the loader graft had before (the split decoded into one tensor, then
  torchvision v2 transforms per image), over N/10 images, where that fits;
- ``decode_loader_img_s``: decoding every image every epoch, the textbook way (ImageFolder +
  per-image transforms), over 5,000 images;
- ``peak_rss_anon_mb_small`` / ``_large``: peak anonymous memory (RssAnon, sampled every 5 ms)
  of a fresh process running graft's training data path (splits table, cache, one epoch of
  augmented batches) over N/10 and over N images;
- ``which_models_s``: ``graft lineage which-models`` warm on 10 versions of N images
  (benchmarks/lineage.py), with the index size.

Prints a table and, last, one JSON line. Targets (issue 15): noop_repro_s < 5;
peak_rss_anon_mb_large <= 1.2 x peak_rss_anon_mb_small; loader_img_s >= 5 x
decode_loader_img_s and >= 0.7 x memory_loader_img_s; incremental_fraction < 0.1;
which_models_s < 2.

    python benchmarks/scale.py --n 250000 --dir /tmp/graft-scale
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("left", "right")
SIDE = 96
BROKEN_EVERY = 25_000
PRETRAIN_IMAGES = 1_000
DECODE_SAMPLE = 5_000


def _jpeg(index: int) -> bytes:
    """A unique 96x96 JPEG: a random 6x6 colour field, enlarged (about 3 KB)."""
    rng = np.random.default_rng(index)
    field = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write(job: tuple[str, int]) -> None:
    Path(job[0]).write_bytes(_jpeg(job[1]))


def generate(root: Path, count: int, first: int = 0, classes: tuple[str, ...] = CLASSES) -> None:
    """``count`` images numbered from ``first`` under ``root``/<class>, plus the broken ones."""
    jobs = []
    for i in range(first, first + count):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:07d}.jpg"), i))
    with multiprocessing.get_context("forkserver").Pool() as pool:
        pool.map(_write, jobs, chunksize=256)
    for i in range(first, first + count, BROKEN_EVERY):
        folder = root / classes[i % len(classes)]
        good = (folder / f"{i:07d}.jpg").read_bytes()
        (folder / f"{i:07d}-truncated.jpg").write_bytes(good[: len(good) // 2])
        (folder / f"{i:07d}-empty.jpg").write_bytes(b"")
        (folder / f"{i:07d}-notes.jpg").write_bytes(b"not a JPEG\n" * 30)


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")


def sh(command: list[str], cwd: Path) -> tuple[float, str]:
    """Run ``command`` in ``cwd``; its wall time in seconds and its output. Exits on failure."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout + result.stderr


def make_project(repo: Path, pretrain: Path, target: Path) -> None:
    """A git + DVC project from this checkout's code, sources and small training settings."""
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for folder in ("graft", "tasks"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"] = {
        "pretrain": {"uri": str(pretrain), "max_reject_fraction": 0.05},
        "target": {"uri": str(target), "max_reject_fraction": 0.05},
    }
    params["common"]["image_size"] = 16  # training is not what this measures
    params["split"]["target"] = {"train": 0.1, "val": 0.05, "test": 0.85}
    params["pretrain"]["epochs"] = 1
    params["finetune"]["head"].update(epochs=1, views=0)
    params["finetune"]["unfreeze"]["epochs"] = 0
    params["evaluate"]["batch_size"] = 1024
    params["register"].update(min_accuracy=0.0, min_class_recall=0.0)  # random images
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        sh(command, repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "benchmark project"], repo)


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# The child processes: one measurement each, so memory figures start from a fresh process.


def _peak_anon(samples: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    samples.append(int(line.split()[1]))
        stop.wait(0.005)


def child_cache_loader(repo: str, size: int, limit: int | None, queue: Any) -> None:
    """graft's training data path over the target images (``limit``: the first of them)."""
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_anon, args=(samples, stop), daemon=True)
    sampler.start()
    import pandas as pd
    import torch

    from graft.config.params import Augment, Common
    from graft.data.decoded_cache import DecodedCache
    from graft.data.loaders import ImageSet, make_loader

    splits = pd.read_csv(Path(repo) / "data" / "splits.csv", usecols=["role", "sha256", "label"])
    rows = splits[splits["role"] == "target"]
    rows = rows.iloc[:limit] if limit else rows
    sha = rows["sha256"].tolist()
    labels = torch.tensor((rows["label"] == CLASSES[1]).to_numpy(), dtype=torch.int64)
    del splits, rows
    images = DecodedCache(Path(repo) / ".graft" / "bench-decoded", size).open(sha)
    common = Common(seed=0, image_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")
    data = ImageSet(images, labels, list(CLASSES), sha, [])
    batches = make_loader(
        data, common, batch_size=256, augment=Augment(rotation=10, translate=0.1), shuffle=True
    )
    started = time.perf_counter()
    seen = sum(len(targets) for _, targets in batches)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    queue.put({"img_s": seen / seconds, "peak_anon_mb": max(samples) / 1024, "images": seen})


def child_memory_loader(repo: str, size: int, limit: int, queue: Any) -> None:
    """graft's loader before the cache: the split decoded into one uint8 tensor, then v2
    transforms image by image in a DataLoader."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.transforms import v2

    from graft.data.decoding import decode_square
    from graft.data.store import ImageStore

    splits = pd.read_csv(Path(repo) / "data" / "splits.csv", usecols=["role", "sha256"])
    sha = splits.loc[splits["role"] == "target", "sha256"].tolist()[:limit]
    with ImageStore(Path(repo) / "data" / "ingested") as store:
        arrays = [torch.from_numpy(decode_square(store.read(s), size)) for s in sha]
    images = torch.stack(arrays).permute(0, 3, 1, 2).contiguous()
    transform = v2.Compose(
        [
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )

    class Transformed(TensorDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
            return (transform(images[i]),)

    loader = DataLoader(Transformed(images), batch_size=256, shuffle=True)
    started = time.perf_counter()
    seen = sum(len(batch[0]) for batch in loader)
    queue.put({"img_s": seen / (time.perf_counter() - started)})


def child_decode_loader(repo: str, size: int, limit: int, queue: Any) -> None:
    """The textbook loader: every image read and decoded every epoch, transforms per image."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from graft.data.decoding import decode_square
    from graft.data.store import ImageStore

    splits = pd.read_csv(Path(repo) / "data" / "splits.csv", usecols=["role", "sha256"])
    sha = splits.loc[splits["role"] == "target", "sha256"].tolist()[:limit]
    store = ImageStore(Path(repo) / "data" / "ingested")
    transform = v2.Compose(
        [
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )

    class Files(Dataset[torch.Tensor]):
        def __len__(self) -> int:
            return len(sha)

        def __getitem__(self, i: int) -> torch.Tensor:
            pixels = torch.from_numpy(decode_square(store.read(sha[i]), size)).permute(2, 0, 1)
            return transform(pixels)

    loader = DataLoader(Files(), batch_size=256, shuffle=True)
    started = time.perf_counter()
    seen = sum(len(batch) for batch in loader)
    queue.put({"img_s": seen / (time.perf_counter() - started)})


def in_child(function: Any, *args: Any) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=function, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def build_cache(repo: Path, size: int) -> tuple[float, int, int]:
    """Seconds to decode every accepted target image into a fresh cache, images, cache bytes."""
    import pandas as pd

    from graft.data.decoded_cache import DecodedCache
    from graft.data.store import ImageStore

    splits = pd.read_csv(repo / "data" / "splits.csv", usecols=["role", "sha256"])
    sha = splits.loc[splits["role"] == "target", "sha256"].tolist()
    folder = repo / ".graft" / "bench-decoded"
    shutil.rmtree(folder, ignore_errors=True)
    cache = DecodedCache(folder, size)
    started = time.perf_counter()
    with ImageStore(repo / "data" / "ingested") as store:
        cache.build(sha, store.read)
    return time.perf_counter() - started, len(sha), folder_bytes(folder)


def sqlite_figures(repo: Path) -> dict[str, float]:
    """The ingest cache's SQLite: size, and the time to load its stat table (every lookup of
    a run after the first is a dict hit)."""
    from graft.data.verify_cache import FileStat, VerifyCache

    database = repo / ".graft" / "ingest-cache" / "verdicts.sqlite"
    with VerifyCache(database.parent) as cache:
        started = time.perf_counter()
        cache.known_hash("/nowhere", FileStat(0, 0, 0))
        load_s = time.perf_counter() - started
    return {"sqlite_mb": database.stat().st_size / 1e6, "sqlite_load_s": load_s}


def lineage_figures(workdir: Path, n: int) -> dict[str, float]:
    command = [sys.executable, str(ROOT / "benchmarks" / "lineage.py"), "--versions", "10"]
    command += ["--images", str(n), "--repeat", "2", "--dir", str(workdir / "lineage")]
    _, output = sh(command, ROOT)
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250_000, help="target images")
    parser.add_argument("--size", type=int, default=64, help="decoded cache side, pixels")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graft-scale"))
    parser.add_argument("--skip-lineage", action="store_true")
    arguments = parser.parse_args()
    n, size, workdir = arguments.n, arguments.size, arguments.dir
    shutil.rmtree(workdir, ignore_errors=True)
    pretrain, target, repo = workdir / "pretrain", workdir / "target", workdir / "repo"
    figures: dict[str, Any] = {"n": n, "size": size}
    rows: list[tuple[str, str]] = []

    started = time.perf_counter()
    generate(pretrain, PRETRAIN_IMAGES, first=10**8, classes=("p0", "p1"))
    generate(target, n)
    rows.append(("generate images", f"{time.perf_counter() - started:.0f} s"))
    make_project(repo, pretrain, target)

    cold_s, output = sh(["dvc", "repro", "ingest"], repo)
    assert ran(output) == ["scan", "ingest"], output
    figures["ingest_img_s"] = (n + PRETRAIN_IMAGES) / cold_s
    rows.append(("cold `dvc repro ingest` (scan + ingest)", f"{cold_s:.1f} s"))

    full_s, output = sh(["dvc", "repro"], repo)
    rows.append(("the rest of the pipeline, small training settings", f"{full_s:.1f} s"))
    noop = []
    for _ in range(3):
        seconds, output = sh(["dvc", "repro"], repo)
        assert ran(output) == ["scan"], output
        noop.append(seconds)
    figures["noop_repro_s"] = min(noop)
    rows.append(("no-op `dvc repro` (best of 3)", f"{min(noop):.2f} s"))
    store = repo / "data" / "ingested"
    shards_before = {p.name for p in (store / "shards").iterdir()}
    store_bytes = folder_bytes(store / "shards")
    figures["store_mb"] = store_bytes / 1e6
    figures["dataset_files"] = sum(1 for p in store.rglob("*") if p.is_file())
    figures.update(sqlite_figures(repo))

    generate(target, n // 100, first=n)
    incremental_s, output = sh(["dvc", "repro", "ingest"], repo)
    assert ran(output) == ["scan", "ingest"], output
    added = {p.name for p in (store / "shards").iterdir()} - shards_before
    added_bytes = sum((store / "shards" / name).stat().st_size for name in added)
    figures["incremental_fraction"] = incremental_s / cold_s
    figures["version_added_mb"] = added_bytes / 1e6
    rows.append(("`dvc repro ingest` after adding 1%", f"{incremental_s:.1f} s"))
    rows.append(("store bytes added by that version", f"{added_bytes / 1e6:.1f} MB"))

    build_s, images, cache_bytes = build_cache(repo, size)
    figures["cache_build_img_s"] = images / build_s
    figures["cache_mb_per_100k"] = cache_bytes / images * 1e5 / 1e6
    rows.append((f"decoded cache build, {images} images at {size} px", f"{build_s:.1f} s"))

    small = in_child(child_cache_loader, str(repo), size, n // 10)
    large = in_child(child_cache_loader, str(repo), size, None)
    figures["loader_img_s"] = large["img_s"]
    figures["peak_rss_anon_mb_small"] = small["peak_anon_mb"]
    figures["peak_rss_anon_mb_large"] = large["peak_anon_mb"]
    figures["memory_loader_img_s"] = in_child(child_memory_loader, str(repo), size, n // 10)[
        "img_s"
    ]
    figures["decode_loader_img_s"] = in_child(
        child_decode_loader, str(repo), size, min(DECODE_SAMPLE, n)
    )["img_s"]
    if not arguments.skip_lineage:
        lineage = lineage_figures(workdir, n)
        figures["which_models_s"] = lineage["warm_s"]
        figures["lineage_index_mb"] = lineage["index_mb"]

    figures["loader_vs_decode"] = figures["loader_img_s"] / figures["decode_loader_img_s"]
    figures["loader_vs_memory"] = figures["loader_img_s"] / figures["memory_loader_img_s"]
    figures["rss_large_vs_small"] = (
        figures["peak_rss_anon_mb_large"] / figures["peak_rss_anon_mb_small"]
    )
    print(f"\n{n} target images of {SIDE}x{SIDE} px (+{PRETRAIN_IMAGES} pretraining)\n")
    print("| step | measured |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value} |")
    for key, value in figures.items():
        if key != "n":
            print(f"| {key} | {value:.3g} |")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
