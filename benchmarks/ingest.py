"""Ingest verification against the usual ways of checking an image folder, on the same files.

Generates N synthetic 500x375 JPEGs in two classes (like Cats-vs-Dogs ``PetImages``) with a
few broken files mixed in, then measures:

- graft's verification, cold: ``graft verify`` (every file read and hashed, fully decoded
  through training's path in worker processes under a memory and time budget, and hashed
  perceptually), and as ingest runs it (the same, plus each accepted image's bytes stored);
- the tutorial check: open each file and call ``Image.verify()``, one core;
- a plain full decode of each file, one core;
- graft's verification again after adding 1% new files (only those are decoded);
- a no-op ``dvc repro ingest`` in a real git + DVC copy of the project whose sources are
  the generated folder.

Cold figures are the fastest of ``--repeat`` interleaved runs per method.

Then near-duplicates (graft.data.near_duplicates, at the default ``max_distance``):

- ``--near-originals`` distinct photo-like images (a smooth 1/f colour field, as natural
  images have, with a few flat shapes; 240 to 520 px a side), each with three copies
  re-encoded as JPEG at quality 60 to 95: resized 0.5x to 2x; cropped by 1 to 5% of each
  side's length (split at random between the two ends); and both. Recall is the fraction of
  (original, copy) pairs that the real grouping puts in one group, all images grouped
  together; the false pair rate is the fraction of pairs of distinct originals within the
  distance; the hash's cost is the mean time of ``perceptual_hash`` on the originals.
- Grouping time for 25,000 and 250,000 hashes, from hex strings as the split stage has them.
  Decoding 250,000 photos would take an hour, so these hashes come from the same hash
  (:func:`~graft.data.near_duplicates.hash_grids`, what follows the resize to 32 x 32) of
  generated 32 x 32 grey grids with the photos' make-up (a 1/f field and flat shapes); one
  image in ten is a near copy of another (shifted by a pixel, with noise), so groups form.

Prints a table and, last, one JSON line with the figures. ``--near-only`` runs only the
near-duplicate part (a minute or two).

    python benchmarks/ingest.py --n 25000 --dir /tmp/graft-bench
    python benchmarks/ingest.py --near-only
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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from graft.config.settings import NearDuplicates
from graft.data.near_duplicates import (
    GRID,
    group_near_duplicates,
    hamming,
    hash_grids,
    hash_values,
    perceptual_hash,
)
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
    # scan runs every time (it is how DVC learns whether the sources changed); nothing else may
    assert re.findall(r"Running stage '(\w+)'", result.stdout) == ["scan"], result.stdout
    return seconds


def _natural_photo(rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: a smooth 1/f colour field, a few flat shapes, blur and noise."""
    width, height = (int(side) for side in rng.integers(240, 521, size=2))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = np.inf  # no constant term: each field has mean 0
    amplitude = frequency ** -rng.uniform(1.0, 1.6)
    shape = (3, *amplitude.shape)
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amplitude
    fields = np.fft.irfft2(spectrum, s=(height, width))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    mixing = rng.normal(size=(3, 3)) * 0.4 + np.eye(3)  # correlated channels, as in photos
    pixels = np.tensordot(mixing, fields, axes=1).transpose(1, 2, 0)
    pixels = 128 + rng.uniform(25, 50) * pixels + rng.uniform(-40, 40, size=3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 7))):
        x, y = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        w, h = rng.uniform(0.08, 0.5) * width, rng.uniform(0.08, 0.5) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            corners = rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * (w, h) + (x, y)
            draw.polygon([tuple(corner) for corner in corners.tolist()], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(
        0, rng.uniform(1, 6), (height, width, 3)
    )
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _near_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of ``image``: ``resized`` (0.5x to 2x), ``cropped`` (1 to 5% of each side) or
    ``both``, then saved as JPEG at quality 60 to 95 and decoded again."""
    if kind in ("resized", "both"):
        scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
    if kind in ("cropped", "both"):
        cut_x, cut_y = rng.uniform(0.01, 0.05, size=2) * image.size
        left, top = rng.uniform(0, 1, size=2) * (cut_x, cut_y)
        box = (left, top, image.width - (cut_x - left), image.height - (cut_y - top))
        image = image.crop(tuple(round(edge) for edge in box))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


NEAR_COPIES = ("resized", "cropped", "both")


def _hash_original(seed: int) -> tuple[str, list[str], float]:
    """Original ``seed``'s hash, its copies' hashes, and seconds to hash the original."""
    rng = np.random.default_rng([7, seed])
    image = _natural_photo(rng)
    started = time.perf_counter()
    digest = perceptual_hash(image)
    seconds = time.perf_counter() - started
    return digest, [perceptual_hash(_near_copy(image, kind, rng)) for kind in NEAR_COPIES], seconds


def _natural_grids(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` grey 32 x 32 grids with the photos' make-up: a 1/f field and flat shapes."""
    fy, fx = np.fft.fftfreq(GRID)[:, None], np.fft.rfftfreq(GRID)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = np.inf
    amplitude = frequency[None] ** -rng.uniform(1.0, 1.6, size=(count, 1, 1))
    spectrum = rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape)
    fields = np.fft.irfft2(spectrum * amplitude, s=(GRID, GRID)).astype(np.float32)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    contrast = rng.uniform(25, 50, size=(count, 1, 1)).astype(np.float32)
    grids = 128 + contrast * fields + rng.uniform(-40, 40, size=(count, 1, 1)).astype(np.float32)
    y, x = np.mgrid[0:GRID, 0:GRID].astype(np.float32) + 0.5
    for _ in range(4):  # up to four shapes each: ellipses or rectangles, flat grey
        centre = rng.uniform(-0.1, 1.1, size=(2, count, 1, 1)).astype(np.float32) * GRID
        radius = rng.uniform(0.04, 0.25, size=(2, count, 1, 1)).astype(np.float32) * GRID
        dx, dy = np.abs(x - centre[0]) / radius[0], np.abs(y - centre[1]) / radius[1]
        ellipse = rng.random((count, 1, 1)) < 0.5
        inside = np.where(ellipse, dx * dx + dy * dy <= 1, np.maximum(dx, dy) <= 1)
        inside &= rng.random((count, 1, 1)) < 0.6
        grey = rng.uniform(0, 255, size=(count, 1, 1)).astype(np.float32)
        grids = np.where(inside, grey, grids)
    return grids


def _synthetic_hashes(count: int, seed: int) -> list[str]:
    """``count`` hex hashes of generated grids, one in ten a near copy of another."""
    rng = np.random.default_rng(seed)
    hashes = []
    for start in range(0, count, 25_000):
        batch = min(25_000, count - start)
        grids = _natural_grids(batch, rng)
        copies = rng.random(batch) < 0.1
        sources = rng.integers(0, batch, size=int(copies.sum()))
        # A near copy: the source moved down a pixel, the edge row repeated (a crop of 3%),
        # with noise (re-encoding).
        moved = np.concatenate([grids[sources, :1], grids[sources, :-1]], axis=1)
        grids[copies] = moved + rng.normal(0, 3, size=moved.shape).astype(np.float32)
        pixels = np.clip(np.rint(grids), 0, 255)
        hashes += [f"{int(value):016x}" for value in hash_grids(pixels)]
    return hashes


def near_duplicate_figures(originals: int) -> dict[str, float]:
    """Recall on copies, false pair rate on distinct images and grouping times (see above)."""
    max_distance = NearDuplicates().max_distance
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool() as pool:
        results = pool.map(_hash_original, range(originals), chunksize=8)
    print(f"\nnear-duplicates at max_distance {max_distance}: hashed {originals} originals "
          f"+ {len(NEAR_COPIES)} copies each in {time.perf_counter() - started:.0f}s")  # fmt: skip
    hashes = [digest for digest, _, _ in results]
    copies = [copy for _, found, _ in results for copy in found]
    groups = group_near_duplicates(hashes + copies, max_distance)
    source_group = np.repeat(groups[:originals], len(NEAR_COPIES))
    together = groups[originals:] == source_group
    values = hash_values(hashes)
    distances = hamming(values[:, None], values[None, :])[np.triu_indices(originals, 1)]
    false_pairs = int((distances <= max_distance).sum())
    per_kind = together.reshape(originals, len(NEAR_COPIES)).mean(axis=0)
    for kind, recall in zip(NEAR_COPIES, per_kind, strict=True):
        print(f"  recall, {kind} + JPEG copies: {recall:.4f}")
    print(f"  distinct originals: {false_pairs} of {len(distances)} pairs within the distance "
          f"(min distance {distances.min()}, median {np.median(distances):.0f})")  # fmt: skip
    figures = {
        "near_dup_recall": float(together.mean()),
        "near_dup_false_pair_rate": false_pairs / len(distances),
        "phash_us_per_image": float(np.mean([seconds for _, _, seconds in results])) * 1e6,
    }
    synthetic = _synthetic_hashes(250_000, seed=11)
    for count, key in ((25_000, "grouping_s_25k"), (250_000, "grouping_s_250k")):
        started = time.perf_counter()
        found = group_near_duplicates(synthetic[:count], max_distance)
        figures[key] = time.perf_counter() - started
        grouped = count - len(np.unique(found))
        print(f"  grouping {count} hashes: {figures[key]:.2f}s ({grouped} joined another's group)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000, help="number of images")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graft-bench-ingest"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; best is kept")
    parser.add_argument(
        "--near-originals", type=int, default=1000, help="distinct images for near-duplicates"
    )
    parser.add_argument(
        "--near-only", action="store_true", help="only the near-duplicate measurements"
    )
    arguments = parser.parse_args()
    figures = {} if arguments.near_only else verification_figures(arguments)
    figures.update(near_duplicate_figures(arguments.near_originals))
    print(json.dumps(figures))


def verification_figures(arguments: argparse.Namespace) -> dict[str, float]:
    """The verification and ingest measurements (see the module's docstring), printed as a
    table and returned for the JSON line."""
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
        # the same figure: every decode now runs in a process under a memory and time budget
        "budgeted_verify_img_s": n / check_s,
        "decode_baseline_images_per_s": n / decode_s,
        "speedup_vs_decode_baseline": decode_s / check_s,
        "corrupt_total": corrupt_total,
        "corrupt_caught": corrupt_caught,
        "verify_baseline_corrupt_caught": verify_caught,
        "incremental_fraction_of_cold": incremental_s / store_s,  # both as ingest runs them
        "noop_repro_s": noop_s,
    }
    return figures


if __name__ == "__main__":
    main()
