"""Ingest verification against the usual ways of checking an image folder, on the same files.

Generates N synthetic 500x375 JPEGs in two classes (like Cats-vs-Dogs ``PetImages``) with a
few broken files mixed in, then measures:

- graft's verification, cold: ``graft verify`` (every file read, hashed and fully decoded),
  and as ingest runs it (the same, plus each accepted image's bytes stored by hash);
- the tutorial check: open each file and call ``Image.verify()``, one core;
- a plain full decode of each file, one core;
- graft's verification again after adding 1% new files (only those are decoded);
- a no-op ``dvc repro ingest`` in a real git + DVC copy of the project whose sources are
  the generated folder.

Cold figures are the fastest of ``--repeat`` interleaved runs per method.

Prints a table and, last, one JSON line with the figures.

    python benchmarks/ingest.py --n 25000 --dir /tmp/graft-bench
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from graft.data.verify import CheckSettings, verify_folder
from graft.data.verify_cache import VerifyCache

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Cat", "Dog")
SIZE = (500, 375)
BROKEN_EVERY = 2500  # one broken file of each kind per this many images


_Y, _X = np.mgrid[0 : SIZE[1], 0 : SIZE[0]].astype(np.float32)


def _photo_like(index: int) -> bytes:
    """A smooth, unique 500x375 JPEG of realistic size (about 34 KB, as in PetImages)."""
    rng = np.random.default_rng(index)
    phase = rng.uniform(0, 6.3, size=3).astype(np.float32)
    scale = rng.uniform(20, 80, size=3).astype(np.float32)
    waves = zip(scale, phase, strict=True)
    channels = [127 + 100 * np.sin(_X / s + _Y / (s * 1.7) + p) for s, p in waves]
    noise = rng.standard_normal(size=(SIZE[1], SIZE[0], 3), dtype=np.float32) * 6
    pixels = np.stack(channels, axis=-1) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _write_image(job: tuple[Path, int]) -> None:
    path, index = job
    path.write_bytes(_photo_like(index))


def generate(root: Path, count: int, first_index: int = 0) -> int:
    """Write ``count`` images (and the broken ones among them); return how many are broken."""
    jobs = []
    for i in range(first_index, first_index + count):
        folder = root / CLASSES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i}.jpg", i))
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_write_image, jobs, chunksize=64)
    broken = 0
    for i in range(first_index, first_index + count, BROKEN_EVERY):
        folder = root / CLASSES[i % 2]
        good = (folder / f"{i}.jpg").read_bytes()
        (folder / f"{i}-truncated.jpg").write_bytes(good[: len(good) * 2 // 3])
        (folder / f"{i}-empty.jpg").write_bytes(b"")
        (folder / f"{i}-notes.jpg").write_bytes(b"Thumbs and notes, not a JPEG\n" * 20)
        broken += 3
    return broken


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _sequential(files: list[Path], check: Callable[[Image.Image], object]) -> tuple[float, int]:
    """Seconds for ``check`` on every file, one core, and how many files it rejected."""
    rejected = 0
    started = time.perf_counter()
    for path in files:
        try:
            with Image.open(path) as image:
                check(image)
        except Exception:
            rejected += 1
    return time.perf_counter() - started, rejected


def _noop_repro(source: Path, cache: Path, workdir: Path) -> float:
    """Seconds of a no-op `dvc repro ingest` in a project copy whose sources are ``source``."""
    repo = workdir / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for folder in ("graft", "tasks"):  # the stage entry points and the library they call
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for role in ("pretrain", "target"):
        params["ingest"]["sources"][role] = {"uri": str(source), "max_reject_fraction": 0.05}
    params["paths"]["ingest"]["cache"] = str(cache)  # verdicts from the cold run are reused
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "ingest"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    started = time.perf_counter()
    result = subprocess.run(
        ["dvc", "repro", "ingest"], cwd=repo, env=env, check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    assert "Running stage" not in result.stdout, result.stdout
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000, help="number of images")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graft-bench-ingest"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; best is kept")
    arguments = parser.parse_args()
    source, cache = arguments.dir / "PetImages", arguments.dir / "cache"
    shutil.rmtree(arguments.dir, ignore_errors=True)
    started = time.perf_counter()
    corrupt_total = generate(source, arguments.n)
    os.sync()  # no write-back of the generated files competing with the first measurement
    print(f"generated {arguments.n} images + {corrupt_total} broken files "
          f"in {time.perf_counter() - started:.0f}s")  # fmt: skip
    files = _all_files(source)
    settings = CheckSettings(min_side=8, max_pixels=89_478_485)

    # This machine's timings swing by 20-30% from run to run, so each method runs
    # --repeat times, interleaved, and the fastest run of each is compared.
    check_runs, store_runs, verify_runs, decode_runs = [], [], [], []
    for _ in range(arguments.repeat):
        started = time.perf_counter()
        checked = verify_folder(source, settings)
        check_runs.append(time.perf_counter() - started)
        shutil.rmtree(cache, ignore_errors=True)  # every run of ingest's verification is cold
        started = time.perf_counter()
        with VerifyCache(cache) as verify_cache:
            stored = verify_folder(source, settings, cache=verify_cache)
        store_runs.append(time.perf_counter() - started)
        assert stored.records == checked.records
        seconds, verify_caught = _sequential(files, lambda image: image.verify())
        verify_runs.append(seconds)
        seconds, decode_caught = _sequential(files, lambda image: image.load())
        decode_runs.append(seconds)
    check_s, store_s = min(check_runs), min(store_runs)
    verify_s, decode_s = min(verify_runs), min(decode_runs)
    corrupt_caught = sum(r.verdict != "accepted" for r in checked.records)
    print("all runs (s): verify " + ", ".join(f"{t:.2f}" for t in check_runs)
          + "; decode baseline " + ", ".join(f"{t:.2f}" for t in decode_runs))  # fmt: skip

    extra = max(1, arguments.n // 100)
    generate(source, extra, first_index=arguments.n + 1)  # indices past the broken files
    os.sync()
    started = time.perf_counter()
    with VerifyCache(cache) as verify_cache:
        incremental = verify_folder(source, settings, cache=verify_cache)
    incremental_s = time.perf_counter() - started

    noop_s = _noop_repro(source, cache, arguments.dir)
    n = len(files)
    rows = [
        ("graft verify, cold (all cores)", check_s, n, corrupt_caught),
        ("ingest's verify + store, cold", store_s, n, corrupt_caught),
        ("Image.verify(), one core", verify_s, n, verify_caught),
        ("full decode, one core", decode_s, n, decode_caught),
        (f"graft verify, +{extra} new files", incremental_s, incremental.decoded, None),
    ]
    print(f"\n{'method':<34}{'seconds':>9}{'files':>8}{'files/s':>10}{'rejected':>10}")
    for name, seconds, count, caught in rows:
        shown = "" if caught is None else str(caught)
        print(f"{name:<34}{seconds:>9.2f}{count:>8}{count / seconds:>10.0f}{shown:>10}")
    print(f"{'no-op dvc repro ingest':<34}{noop_s:>9.2f}")
    print(f"broken files planted: {corrupt_total}")
    figures = {
        "n": arguments.n,
        "verify_images_per_s": n / check_s,
        "decode_baseline_images_per_s": n / decode_s,
        "speedup_vs_decode_baseline": decode_s / check_s,
        "corrupt_total": corrupt_total,
        "corrupt_caught": corrupt_caught,
        "verify_baseline_corrupt_caught": verify_caught,
        "incremental_fraction_of_cold": incremental_s / store_s,  # both as ingest runs them
        "noop_repro_s": noop_s,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
