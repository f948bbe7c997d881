"""The decoded-image cache gives exactly what a direct decode gives, only under the settings it
was made with, never a half-written segment, and works with several processes at once.

Images are tiny real JPEG and PNG files made with Pillow. Crashes and concurrency use real
child processes (this environment's python importing graft): a builder killed for real with
SIGKILL inside its write, two readers and two builders running at the same moment.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from helpers import ROOT, poll_until, tool_env
from PIL import Image

from graft.data import decoded_cache
from graft.data.decoded_cache import DecodedCache
from graft.data.decoding import load_rgb
from graft.errors import GraftError

SIZE = 8

# Builds the cache at argv[1] (size argv[2]) for the keys listed in argv[4], reading blobs
# from the folder argv[3]. Kills itself with SIGKILL when read number argv[5] + 1 starts
# (0: never); argv[6] > 0 caps segments at that many images. With argv[7], it touches
# "<argv[7]>.ready-<pid>" and waits for the file argv[7] before building.
BUILDER = """\
import os, signal, sys, threading, time
from pathlib import Path
from graft.data import decoded_cache

root, size, blobs, keys, kill_after, segment_images, go, delay = sys.argv[1:]
size, kill_after, segment_images = int(size), int(kill_after), int(segment_images)
if segment_images:
    decoded_cache.SEGMENT_BYTES = segment_images * 3 * size * size
reads, lock = 0, threading.Lock()

def read(sha):
    global reads
    with lock:
        reads += 1
        if 0 < kill_after < reads:
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(delay))
    return (Path(blobs) / sha).read_bytes()

if go:
    Path(f"{go}.ready-{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)
cache = decoded_cache.DecodedCache(Path(root), size)
print(cache.build(Path(keys).read_text().split(), read, workers=2))
"""

# Unpickles CachedImages from argv[1] and gathers every image in shuffled orders, comparing
# with the array in argv[2]; touches argv[3] once loaded and starts when the file argv[4] exists.
READER = """\
import pickle, sys, time
from pathlib import Path
import numpy as np, torch

images = pickle.loads(Path(sys.argv[1]).read_bytes())
expected = torch.from_numpy(np.load(sys.argv[2]))
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.01)
rng = np.random.default_rng(int(sys.argv[5]))
for _ in range(100):
    positions = rng.integers(0, len(images), size=2 * len(images))
    assert torch.equal(images.gather(positions), expected[positions]), "wrong pixels"
print("ok")
"""


def make_blobs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` tiny image files named by their sha256 in ``folder``; their sha256s, in order.

    JPEG and PNG in turn, of varied non-square sizes; every third JPEG has an EXIF rotation
    and every other PNG an alpha channel, so decoding has something to get right.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shas = []
    for i in range(count):
        channels = 4 if i % 4 == 1 else 3
        pixels = rng.integers(0, 256, (9 + i % 5, 14 + i % 7, channels), dtype=np.uint8)
        image = Image.fromarray(pixels)
        stream = io.BytesIO()
        if i % 2 == 0:
            exif = Image.Exif()
            if i % 3 == 0:
                exif[0x0112] = 6  # orientation: rotate 90 degrees on display
            image.save(stream, "JPEG", quality=90, exif=exif)
        else:
            image.save(stream, "PNG")
        data = stream.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        (folder / sha).write_bytes(data)
        shas.append(sha)
    return shas


def reader(folder: Path) -> Callable[[str], bytes]:
    return lambda sha: (folder / sha).read_bytes()


def direct(folder: Path, shas: list[str], size: int = SIZE) -> torch.Tensor:
    """What a direct decode gives: ``load_rgb`` of each file, permuted to CHW; (B, 3, s, s)."""
    return torch.stack([torch.from_numpy(load_rgb(folder / sha, size)) for sha in shas]).permute(
        0, 3, 1, 2
    )


def temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name)


def start(children: list[subprocess.Popen[str]], script: str, *args: object) -> None:
    command = [sys.executable, "-c", script, *map(str, args)]
    children.append(
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=tool_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 120) -> tuple[int, str]:
    """Wait for ``process``: (its exit status, its stdout); stderr shown on failure."""
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode in (0, -signal.SIGKILL), err
    return process.returncode, out


@pytest.mark.parametrize("segment_images", [None, 2])
def test_gives_what_a_direct_decode_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segment_images: int | None
) -> None:
    if segment_images is not None:  # several segments: gathers span them
        monkeypatch.setattr(decoded_cache, "SEGMENT_BYTES", segment_images * 3 * SIZE * SIZE)
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 7)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    assert cache.build(shas, reader(blobs), workers=2) == 7
    segments = sorted(cache.folder.glob("*.npy"))
    assert len(segments) == (1 if segment_images is None else 4)
    assert all(np.load(path, mmap_mode="r").dtype == np.uint8 for path in segments)

    request = [shas[5], shas[0], shas[5], shas[3], shas[6], shas[1], shas[0]]
    images = cache.open(request)
    assert len(images) == len(request)
    assert torch.equal(images.gather(range(len(request))), direct(blobs, request))
    positions = [6, 2, 2, 0, 4]
    assert torch.equal(images.gather(np.array(positions)), direct(blobs, request)[positions])
    assert images.gather([]).shape == (0, 3, SIZE, SIZE)

    # A pickle (as DataLoader workers get it) reads the same, maps opened or not.
    assert torch.equal(
        pickle.loads(pickle.dumps(images)).gather(positions), images.gather(positions)
    )


def test_other_settings_never_read_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 3)
    root = tmp_path / "cache"
    made = DecodedCache(root, SIZE)
    made.build(shas, reader(blobs))

    others = [DecodedCache(root, SIZE + 4)]
    with monkeypatch.context() as patch:
        patch.setattr(decoded_cache, "DECODER_VERSION", decoded_cache.DECODER_VERSION + 1)
        others.append(DecodedCache(root, SIZE))
    with monkeypatch.context() as patch:
        patch.setattr(PIL, "__version__", "999.0.0")
        others.append(DecodedCache(root, SIZE))
    for other in others:
        assert other.folder != made.folder
        with pytest.raises(GraftError, match="3 images are not in the decoded cache"):
            other.open(shas)
    # Made under the settings in force again: read.
    assert torch.equal(DecodedCache(root, SIZE).open(shas).gather([0, 1, 2]), direct(blobs, shas))


# Killed as its fourth read starts: mid-segment, after some of its images were decoded. With
# segments of 2 images, the first segment was committed before.
@pytest.mark.parametrize(("segment_images", "committed"), [(0, 0), (2, 2)])
def test_a_killed_build_leaves_nothing_that_is_read(
    tmp_path: Path, children: list[subprocess.Popen[str]], segment_images: int, committed: int
) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 6)
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(shas))
    root = tmp_path / "cache"
    start(children, BUILDER, root, SIZE, blobs, keys, 3, segment_images, "", 0)
    assert finish(children[0])[0] == -signal.SIGKILL

    cache = DecodedCache(root, SIZE)
    assert len(temporaries(cache.folder)) == 2  # the interrupted segment's .keys and .npy
    ordered = sorted(shas)  # segments are written in sha order
    if committed:  # segments finished before the kill are read, and whole
        got = cache.open(ordered[:committed]).gather(range(committed))
        assert torch.equal(got, direct(blobs, ordered[:committed]))
    for sha in ordered[committed:]:
        with pytest.raises(GraftError, match="1 images are not in the decoded cache"):
            cache.open([sha])

    assert cache.build(shas, reader(blobs)) == len(shas) - committed
    assert temporaries(cache.folder) == []
    assert torch.equal(cache.open(shas).gather(range(len(shas))), direct(blobs, shas))


def test_two_processes_read_at_once(tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 9)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.build(shas, reader(blobs))
    images = cache.open(shas[::-1])
    images.gather([0])  # a map opened here must not travel in the pickle
    (tmp_path / "images.pickle").write_bytes(pickle.dumps(images))
    np.save(tmp_path / "expected.npy", direct(blobs, shas[::-1]).numpy())

    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    for i, touched in enumerate(ready):
        start(
            children, READER, tmp_path / "images.pickle", tmp_path / "expected.npy", touched, go, i
        )
    poll_until(lambda: all(p.exists() for p in ready), bool, "both readers to load", 120, 0.05)
    go.touch()
    assert [finish(child) for child in children] == [(0, "ok\n")] * 2


def test_two_builders_at_once(tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 12)
    root, go = tmp_path / "cache", tmp_path / "go"
    for i, part in enumerate((shas[:8], shas[4:])):  # overlapping: 4 keys wanted by both
        keys = tmp_path / f"keys-{i}.txt"
        keys.write_text("\n".join(part))
        start(children, BUILDER, root, SIZE, blobs, keys, 0, 0, go, 0.02)
    ready = lambda: len(list(tmp_path.glob("go.ready-*")))  # noqa: E731
    poll_until(ready, lambda count: count == 2, "both builders to load", 120, 0.05)
    go.touch()
    results = [finish(child) for child in children]
    assert [status for status, _ in results] == [0, 0]
    # Under the lock the second builder sees the first's segments: nothing decoded twice.
    assert sum(int(out) for _, out in results) == len(shas)

    cache = DecodedCache(root, SIZE)
    assert temporaries(cache.folder) == []
    assert torch.equal(cache.open(shas).gather(range(len(shas))), direct(blobs, shas))
    assert cache.build(shas, reader(blobs)) == 0


def test_a_corrupted_or_undecodable_blob_is_named(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 4)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    swapped = {shas[2]: shas[1]}  # shas[2]'s bytes are another image's: a corrupted store

    def corrupted(sha: str) -> bytes:
        return (blobs / swapped.get(sha, sha)).read_bytes()

    with pytest.raises(GraftError, match=f"image {shas[2]}: its bytes do not match its sha256"):
        cache.build(shas, corrupted, workers=2)
    assert temporaries(cache.folder) == []
    with pytest.raises(GraftError, match="4 images are not in the decoded cache"):
        cache.open(shas)

    garbage = b"not an image at all"
    (blobs / hashlib.sha256(garbage).hexdigest()).write_bytes(garbage)
    unreadable = hashlib.sha256(garbage).hexdigest()
    with pytest.raises(GraftError, match=f"image {unreadable} cannot be decoded"):
        cache.build([unreadable], reader(blobs))
    assert temporaries(cache.folder) == []


def test_build_is_incremental(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 5)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    assert cache.build(shas[:4] + shas[:2], reader(blobs)) == 4  # duplicates count once
    assert cache.build(shas[:4], reader(blobs)) == 0
    assert cache.build(shas, reader(blobs)) == 1
    assert torch.equal(cache.open(shas).gather(range(5)), direct(blobs, shas))


def test_a_truncated_segment_is_ignored_and_rebuilt(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    shas = make_blobs(blobs, 3)
    cache = DecodedCache(tmp_path / "cache", SIZE)
    cache.build(shas, reader(blobs))
    (segment,) = cache.folder.glob("*.npy")
    segment.write_bytes(segment.read_bytes()[:-1])  # as a machine crash might leave it
    with pytest.raises(GraftError, match="3 images are not in the decoded cache"):
        cache.open(shas)
    assert cache.build(shas, reader(blobs)) == 3
    assert torch.equal(cache.open(shas).gather(range(3)), direct(blobs, shas))
