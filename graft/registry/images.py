"""One ingested image, byte for byte, at any revision: what ``graft lineage image`` prints.

Built on DVC's own API (``dvc.api.open``), so the image comes from the local DVC cache when it
is there and from the project's DVC remote otherwise, exactly as ``dvc get`` would fetch it.
The dataset folder's path is read from ``params.yaml`` at that revision; both its layouts are
read: shards with ``index.csv`` (graft.data.store) and the earlier one file per image.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath

import dvc.api

from graft.data.store import INDEX_NAME, LEGACY_IMAGES, SHARDS_NAME
from graft.errors import GraftError
from graft.hashing import sha256_hex
from graft.registry.revisions import RevisionError, params_at, resolve_commit


class ImageNotFound(GraftError):
    """The revision's dataset holds no image with that sha256."""


class ImageDamaged(GraftError):
    """The bytes found for an image do not hash to its sha256 (a damaged cache or remote)."""


def image_bytes(root: Path, sha256: str, rev: str = "HEAD") -> bytes:
    """The exact bytes of the ingested image ``sha256`` (hex) in the dataset at ``rev`` of the
    DVC project ``root``.

    Raises ImageNotFound when that dataset does not hold it, ImageDamaged when the bytes found
    do not hash to ``sha256``, RevisionError when ``rev`` does not resolve, and DVC's errors
    when the data is in neither the cache nor a remote.
    """
    data = _find(root, sha256, rev)
    if sha256_hex(data) != sha256.lower():
        raise ImageDamaged(
            f"the bytes stored for image {sha256} at {rev} hash to something else: the DVC "
            "cache or remote that holds them is damaged"
        )
    return data


def _find(root: Path, sha256: str, rev: str) -> bytes:
    """The bytes stored for image ``sha256`` at ``rev``, unchecked (see :func:`image_bytes`)."""
    commit = resolve_commit(root, rev)
    if commit is None:
        raise RevisionError(f"{rev!r} is not a revision of {root}")
    dataset = PurePosixPath(params_at(root, commit)["paths"]["ingest"]["dataset"])
    repo = str(root)
    try:
        with dvc.api.open(str(dataset / INDEX_NAME), repo=repo, rev=commit) as stream:
            rows = [row for row in csv.DictReader(stream) if row["sha256"] == sha256]
    except FileNotFoundError:  # the layout before shards: one file per image
        legacy = dataset / LEGACY_IMAGES / sha256[:2] / sha256
        try:
            return dvc.api.read(str(legacy), repo=repo, rev=commit, mode="rb")
        except FileNotFoundError:
            raise ImageNotFound(f"no image {sha256} in {dataset} at {rev}") from None
    if not rows:
        raise ImageNotFound(f"no image {sha256} in {dataset}/{INDEX_NAME} at {rev}")
    row = rows[0]
    offset, size = int(row["offset"]), int(row["size"])
    shard = dataset / SHARDS_NAME / row["shard"]
    with dvc.api.open(str(shard), repo=repo, rev=commit, mode="rb") as stream:
        _skip(stream, offset)
        return stream.read(size)


def _skip(stream: io.BufferedIOBase, count: int) -> None:
    """Move ``count`` bytes into ``stream``, by seeking where it can (the cache) and by reading
    where it cannot (a remote's stream)."""
    try:
        stream.seek(count)
    except (OSError, io.UnsupportedOperation, AttributeError):
        while count:
            count -= len(stream.read(min(count, 1 << 20)))
