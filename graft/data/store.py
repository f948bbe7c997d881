"""The image store of the ingested dataset: every accepted image's exact bytes, packed in shards.

Layout of ``paths.ingest.dataset`` (besides ``manifest.csv``, see graft.data.layout):

- ``shards/<name>.zip``: uncompressed zip archives whose members are images named by their
  sha256 (hex), in sha256 order; ``<name>`` is a digest of the member names, so a shard's name
  says what it holds.
- ``index.csv``: one row per member of every shard (sha256, shard, offset, size), in sha256
  order. ``offset`` is where the member's bytes start in the shard file and ``size`` their
  length, both in bytes, so one image is one ``pread`` away.

Why shards: DVC checks every file of an output on every ``dvc repro``; with one file per image
a no-op run took 3 s at 25,000 images and grew linearly (DVC's maintainers tell users to zip
many small files). Why these shards: an ingest keeps every earlier shard byte for byte
(hard-linked, not rewritten) and packs only images it has not stored before into new shards,
so DVC's cache and remote hold each image once across dataset versions. Images that left the
dataset stay in their shard until fewer than half of its images are live; then its live images
are packed again with the new ones and the shard is dropped.

One image, byte for byte, without graft: look its shard up in ``index.csv`` and run
``unzip -p shards/<shard>.zip <sha256>`` (or ``dvc get`` both files at a revision first;
``graft image`` does it in one command).

A dataset written before shards (``images/<sha256[:2]>/<sha256>``, one file per image) is still
read: :class:`ImageStore` serves both layouts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from graft.errors import GraftError

INDEX_NAME = "index.csv"
SHARDS_NAME = "shards"
LEGACY_IMAGES = "images"  # one file per image, before shards
SHARD_BYTES = 64 * 2**20  # bytes of images per new shard (one larger image gets its own)
REPACK_BELOW = 0.5  # a shard with a smaller fraction of live images is packed again
INDEX_COLUMNS = ["sha256", "shard", "offset", "size"]
# Fixed member metadata: a shard's bytes depend only on the images in it.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_READ_ONLY = 0o100444 << 16


class StoreError(GraftError):
    """The image store is missing an image, or its index and shards disagree."""


@dataclass(frozen=True)
class Location:
    """Where one image's bytes are: ``shard`` (a file name under ``shards/``), the ``offset``
    of its first byte and its ``size``, in bytes."""

    shard: str
    offset: int
    size: int


def index_path(dataset: Path) -> Path:
    """Where the shard index of ``dataset`` lives."""
    return dataset / INDEX_NAME


def shard_path(dataset: Path, shard: str) -> Path:
    """Where the shard named ``shard`` (``<name>.zip``) of ``dataset`` lives."""
    return dataset / SHARDS_NAME / shard


def read_index(dataset: Path) -> pd.DataFrame:
    """The shard index of ``dataset`` (columns INDEX_COLUMNS); empty when it has none.

    Raises StoreError when the file exists but does not have the index's columns.
    """
    path = index_path(dataset)
    if not path.is_file():
        return pd.DataFrame({name: pd.Series(dtype=object) for name in INDEX_COLUMNS})
    types: dict[str, str] = {"sha256": "str", "shard": "str", "offset": "int64", "size": "int64"}
    index = pd.read_csv(path, dtype=types)
    if list(index.columns) != INDEX_COLUMNS:
        raise StoreError(f"{path} has columns {list(index.columns)}, not {INDEX_COLUMNS}")
    return index


class ImageStore:
    """Reads images of one ingested dataset folder by sha256, from shards or the old layout.

    A folder without an index or old-layout images is an empty store. The index is held as
    numpy arrays (about 100 bytes per image, not Python objects per image). :meth:`read` is
    safe from many threads (``os.pread``); close the store, or use it as a context manager, to
    close the shard files it opened.
    """

    def __init__(self, dataset: Path) -> None:
        self.dataset = dataset
        index = read_index(dataset)
        sha = np.array(index["sha256"].to_numpy(dtype=str), dtype="S64")
        order = np.argsort(sha, kind="stable")
        self._sha = sha[order]
        codes, names = pd.factorize(index["shard"].to_numpy()[order])
        self._shard = codes.astype(np.int32)
        self._names = [str(name) for name in names]
        self._offset = index["offset"].to_numpy(dtype=np.int64)[order]
        self._size = index["size"].to_numpy(dtype=np.int64)[order]
        self._files: dict[int, int] = {}
        self._opening = threading.Lock()
        self.legacy = not index_path(dataset).is_file() and (dataset / LEGACY_IMAGES).is_dir()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files this store opened."""
        for handle in self._files.values():
            os.close(handle)
        self._files.clear()

    def __len__(self) -> int:
        """Images in the shards (0 for the old layout, which has no index)."""
        return len(self._sha)

    def __contains__(self, sha256: object) -> bool:
        if self.legacy:
            return isinstance(sha256, str) and self._legacy_path(sha256).is_file()
        return isinstance(sha256, str) and self._position(sha256) is not None

    def locate(self, sha256: str) -> Location | None:
        """Where the image with this sha256 (hex) is in a shard; None when no shard holds it."""
        at = self._position(sha256)
        if at is None:
            return None
        return Location(self._names[self._shard[at]], int(self._offset[at]), int(self._size[at]))

    def read(self, sha256: str) -> bytes:
        """The exact bytes of the image with this sha256 (hex).

        Raises StoreError when the store does not hold it or a shard is shorter than its index
        says, and OSError when a file cannot be read. The bytes are not hashed here: whoever
        decodes them checks them (the decoded cache does).
        """
        if self.legacy:
            path = self._legacy_path(sha256)
            if not path.is_file():
                raise StoreError(f"image {sha256} is not in {self.dataset}")
            return path.read_bytes()
        at = self._position(sha256)
        if at is None:
            raise StoreError(f"image {sha256} is not in {index_path(self.dataset)}")
        size = int(self._size[at])
        data = os.pread(self._file(int(self._shard[at])), size, int(self._offset[at]))
        if len(data) != size:
            raise StoreError(
                f"shard {self._names[self._shard[at]]} of {self.dataset} is shorter than its "
                f"index says (image {sha256}): the folder is damaged; `dvc checkout` restores it"
            )
        return data

    def _position(self, sha256: str) -> int | None:
        key = sha256.encode()
        at = int(np.searchsorted(self._sha, key))
        return at if at < len(self._sha) and self._sha[at] == key else None

    def _legacy_path(self, sha256: str) -> Path:
        return self.dataset / LEGACY_IMAGES / sha256[:2] / sha256

    def _file(self, code: int) -> int:
        with self._opening:  # two threads must not both open (and leak) the same shard
            if code not in self._files:
                path = shard_path(self.dataset, self._names[code])
                self._files[code] = os.open(path, os.O_RDONLY)
            return self._files[code]


@dataclass(frozen=True)
class Packing:
    """What :func:`pack` did: shards kept byte for byte from the previous dataset, shards
    written new, shards dropped (every image gone, or repacked) and images packed."""

    kept: list[str]
    written: list[str]
    dropped: list[str]
    packed: int


def pack(
    staging: Path,
    accepted: Mapping[str, int],
    previous: Path | None,
    read_new: Callable[[str], bytes],
    *,
    shard_bytes: int = SHARD_BYTES,
) -> Packing:
    """Write the store of the ``accepted`` images into the empty folder ``staging``.

    ``accepted`` maps each image's sha256 (hex) to its size in bytes. Shards of the
    ``previous`` dataset folder (None, or a folder without an index: none) are hard-linked
    unchanged while at least REPACK_BELOW of their images are accepted; every other accepted
    image is packed into new shards of about ``shard_bytes`` bytes, in sha256 order, its bytes
    taken from the previous store when it holds them and from ``read_new`` otherwise. So the
    same previous folder and the same accepted images always give the same bytes.

    Raises OSError when a file cannot be read or written, and StoreError when an image's bytes
    are not where they should be.
    """
    before = read_index(previous) if previous is not None else read_index(staging)
    kept, dropped = _keep_or_drop(before, accepted, previous)
    kept_rows = before[before["shard"].isin(kept)]
    fresh = sorted(set(accepted) - set(kept_rows["sha256"]))
    rows = [kept_rows]
    (staging / SHARDS_NAME).mkdir(parents=True, exist_ok=True)
    for shard in kept:
        assert previous is not None  # kept shards come from a previous folder
        _link_or_copy(shard_path(previous, shard), shard_path(staging, shard))
    with ImageStore(previous if previous is not None else staging) as old:

        def read(sha: str) -> bytes:
            data = old.read(sha) if sha in old else read_new(sha)
            if len(data) != accepted[sha]:
                raise StoreError(f"image {sha} has {len(data)} bytes, not {accepted[sha]}")
            return data

        written = [
            _write_shard(staging, group, read, rows)
            for group in _groups(fresh, accepted, shard_bytes)
        ]
    index = pd.concat(rows, ignore_index=True).sort_values("sha256", kind="stable")
    index.to_csv(index_path(staging), index=False, lineterminator="\n")
    return Packing(kept, written, dropped, len(fresh))


def _keep_or_drop(
    before: pd.DataFrame, accepted: Mapping[str, int], previous: Path | None
) -> tuple[list[str], list[str]]:
    """The previous shards to keep as they are and those to drop, each in name order."""
    kept: list[str] = []
    dropped: list[str] = []
    if previous is None or before.empty:
        return kept, dropped
    live = before["sha256"].isin(accepted.keys())
    for shard, members in before.groupby("shard").groups.items():
        fraction = float(live[members].mean())
        whole = shard_path(previous, str(shard)).is_file()
        (kept if whole and fraction > 0 and fraction >= REPACK_BELOW else dropped).append(
            str(shard)
        )
    return sorted(kept), sorted(dropped)


def _groups(shas: Sequence[str], sizes: Mapping[str, int], shard_bytes: int) -> list[list[str]]:
    """``shas`` cut, in order, into runs of at most ``shard_bytes`` bytes (at least one each)."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for sha in shas:
        if current and total + sizes[sha] > shard_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(sha)
        total += sizes[sha]
    if current:
        groups.append(current)
    return groups


def _write_shard(
    staging: Path, shas: list[str], read: Callable[[str], bytes], rows: list[pd.DataFrame]
) -> str:
    """Write one shard of ``shas`` (sorted) under ``staging`` and add its index rows to
    ``rows``; returns its file name."""
    name = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:32] + ".zip"
    target = shard_path(staging, name)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for sha in shas:
            member = zipfile.ZipInfo(sha, date_time=_EPOCH)
            member.external_attr = _READ_ONLY
            archive.writestr(member, read(sha))
        members = archive.infolist()
    # A stored member's bytes follow its 30-byte local header, its name and its extra field.
    rows.append(
        pd.DataFrame(
            {
                "sha256": [m.filename for m in members],
                "shard": name,
                "offset": [m.header_offset + 30 + len(m.filename) + len(m.extra) for m in members],
                "size": [m.file_size for m in members],
            }
        )
    )
    os.chmod(target, 0o444)
    return name


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: hard-linked when possible (no copy), else copied."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, target)
