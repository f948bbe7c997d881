"""The packed image store: exact bytes back, earlier shards kept byte for byte, readable
without graft, deterministic, and a damaged shard named."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from graft.data.store import (
    ImageStore,
    Packing,
    StoreError,
    index_path,
    pack,
    read_index,
    shard_path,
)
from graft.hashing import sha256_hex


def blobs(count: int, start: int = 0, size: int = 300) -> dict[str, bytes]:
    """``count`` distinct byte strings of about ``size`` bytes, by their sha256."""
    made = [f"image {i} ".encode() * (size // 8) for i in range(start, start + count)]
    return {sha256_hex(data): data for data in made}


def write(
    folder: Path, images: dict[str, bytes], previous: Path | None, shard_bytes: int
) -> Packing:
    folder.mkdir()
    sizes = {sha: len(data) for sha, data in images.items()}
    return pack(folder, sizes, previous, images.__getitem__, shard_bytes=shard_bytes)


def shard_bytes_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / "shards").iterdir()}


def test_every_image_comes_back_byte_for_byte_also_without_graft(tmp_path: Path) -> None:
    images = blobs(40)
    packing = write(tmp_path / "v1", images, None, shard_bytes=3000)
    assert packing.packed == 40 and len(packing.written) > 1 and not packing.kept
    with ImageStore(tmp_path / "v1") as store:
        assert len(store) == 40
        for sha, data in images.items():
            assert store.read(sha) == data
    index = read_index(tmp_path / "v1")
    assert list(index["sha256"]) == sorted(images)
    shards = index["shard"].astype(str)
    for sha, shard_name in zip(index["sha256"].astype(str), shards, strict=True):
        shard = shard_path(tmp_path / "v1", shard_name)
        with zipfile.ZipFile(shard) as archive:
            assert archive.testzip() is None and archive.read(sha) == images[sha]
        # what a person without graft would run
        unzipped = subprocess.run(["unzip", "-p", shard, sha], capture_output=True)
        assert unzipped.stdout == images[sha]


def test_a_new_version_keeps_earlier_shards_and_packs_only_new_images(tmp_path: Path) -> None:
    first = blobs(30)
    write(tmp_path / "v1", first, None, shard_bytes=3000)
    added = blobs(5, start=100)
    packing = write(tmp_path / "v2", {**first, **added}, tmp_path / "v1", shard_bytes=3000)
    before, after = shard_bytes_of(tmp_path / "v1"), shard_bytes_of(tmp_path / "v2")
    assert set(packing.kept) == set(before) and packing.packed == 5
    assert {name: after[name] for name in before} == before  # unchanged, byte for byte
    new = set(after) - set(before)
    assert new == set(packing.written)
    index = read_index(tmp_path / "v2")
    assert set(index.loc[index["shard"].isin(new), "sha256"]) == set(added)
    with ImageStore(tmp_path / "v2") as store:
        assert all(store.read(sha) == data for sha, data in {**first, **added}.items())


def test_shards_mostly_gone_are_repacked_and_empty_ones_dropped(tmp_path: Path) -> None:
    images = blobs(20)
    write(tmp_path / "v1", images, None, shard_bytes=1 << 20)  # one shard
    (only,) = shard_bytes_of(tmp_path / "v1")
    half_gone = dict(list(images.items())[:9])  # 9 of 20 live: under half, so repacked
    packing = write(tmp_path / "v2", half_gone, tmp_path / "v1", shard_bytes=1 << 20)
    assert packing.dropped == [only] and packing.packed == 9 and not packing.kept
    assert sorted(read_index(tmp_path / "v2")["sha256"]) == sorted(half_gone)
    packing = write(tmp_path / "v3", blobs(3, start=50), tmp_path / "v2", shard_bytes=1 << 20)
    assert packing.dropped == packing_names(tmp_path / "v2") and packing.packed == 3
    most_live = dict(list(half_gone.items())[:5])  # 5 of 9 live: kept, dead ones stay inside
    packing = write(tmp_path / "v4", most_live, tmp_path / "v2", shard_bytes=1 << 20)
    assert packing.kept == packing_names(tmp_path / "v2") and packing.packed == 0
    with ImageStore(tmp_path / "v4") as store:
        assert all(store.read(sha) == data for sha, data in most_live.items())


def packing_names(folder: Path) -> list[str]:
    return sorted(shard_bytes_of(folder))


def test_the_same_images_and_history_give_the_same_bytes(tmp_path: Path) -> None:
    images = blobs(25)
    write(tmp_path / "a", images, None, shard_bytes=2000)
    write(tmp_path / "b", dict(reversed(list(images.items()))), None, shard_bytes=2000)
    assert shard_bytes_of(tmp_path / "a") == shard_bytes_of(tmp_path / "b")
    assert index_path(tmp_path / "a").read_bytes() == index_path(tmp_path / "b").read_bytes()


def test_a_damaged_or_incomplete_store_is_named(tmp_path: Path) -> None:
    images = blobs(4)
    write(tmp_path / "v1", images, None, shard_bytes=1 << 20)
    (name,) = shard_bytes_of(tmp_path / "v1")
    shard = shard_path(tmp_path / "v1", name)
    os.chmod(shard, 0o644)
    with shard.open("r+b") as handle:
        handle.truncate(100)
    offsets = read_index(tmp_path / "v1").set_index("sha256")["offset"].astype(int)
    last = max(images, key=lambda sha: int(offsets[sha]))
    with ImageStore(tmp_path / "v1") as store, pytest.raises(StoreError, match="shorter"):
        store.read(last)
    with ImageStore(tmp_path / "v1") as store, pytest.raises(StoreError, match="not in"):
        store.read("0" * 64)


def test_the_one_file_per_image_layout_is_still_read(tmp_path: Path) -> None:
    images = blobs(3)
    for sha, data in images.items():
        path = tmp_path / "old" / "images" / sha[:2] / sha
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with ImageStore(tmp_path / "old") as store:
        assert store.legacy and all(store.read(sha) == data for sha, data in images.items())
        assert next(iter(images)) in store and "0" * 64 not in store
    # and a new version packs them, taking their bytes from the old layout
    packing = write(tmp_path / "new", images, tmp_path / "old", shard_bytes=1 << 20)
    assert packing.packed == 3
    with ImageStore(tmp_path / "new") as store:
        assert all(store.read(sha) == data for sha, data in images.items())
