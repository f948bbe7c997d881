"""A source folder's fingerprint: what ingest would read, summarised in a few lines.

The ``scan`` stage writes one per source, and ``ingest`` depends on that file instead of on the
source folders. DVC then checks one small file, not every image, on every ``dvc repro``: at
250,000 images DVC's own check of the folders alone took longer than the whole no-op run may.
The fingerprint is exact, not a guess from timestamps: it digests every file's path and sha256
content hash, the class folders and what was skipped, so ingest re-runs exactly when its
outputs could change, and the fingerprint is the same on every machine and every clone.

Hashes come from ingest's stat cache (graft.data.verify_cache): a file whose size, mtime and
inode are unchanged is not read again, the same rule DVC and git use, so a scan of an
unchanged folder only lists it. Files it has to read are hashed in threads and remembered.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_module
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from graft.config.params import ROLES, ParamsError, describe_problems
from graft.config.settings import Sources
from graft.data.sources import SourceFile, class_folders, display_name, scan_folder
from graft.data.verify_cache import FileStat, VerifyCache
from graft.hashing import file_sha256

NOT_A_FILE = "not-a-regular-file"  # FIFOs, devices: never opened, ingest finds them unreadable


def fingerprint(root: Path, cache: VerifyCache, *, threads: int = 4) -> dict[str, Any]:
    """The fingerprint of the source folder ``root``, with hashes from and into ``cache``.

    Returns ``{"classes": [...], "files": n, "bytes": total, "skipped": {reason: n},
    "sha256": hex}``: class folder names in ingest's order, the number and total size (bytes)
    of the files ingest would read, the counts of entries it skips, and the sha256 of one line
    ``<path>\\t<content sha256>`` per file in ingest's order (a file that cannot be read or is
    not a regular file stands as ``unreadable: <why>`` or ``not-a-regular-file``). ``threads``
    hash the files the cache does not know. Raises OSError when ``root`` cannot be listed.
    """
    files, skipped = scan_folder(root)
    known = cache.stat_hashes()
    hashes: list[str | None] = []
    unknown: list[tuple[int, FileStat]] = []
    total = 0
    # One tight loop: at 250,000 files every microsecond here is a quarter of a second of
    # every no-op `dvc repro`.
    for i, file in enumerate(files):
        try:
            result = os.stat(file.path)
        except OSError as error:
            hashes.append(f"unreadable: {error.strerror}")
            continue
        if not stat_module.S_ISREG(result.st_mode):
            hashes.append(NOT_A_FILE)  # opening a FIFO would block
            continue
        total += result.st_size
        entry = known.get(display_name(file.path))
        if entry is not None and entry[:3] == (result.st_size, result.st_mtime_ns, result.st_ino):
            hashes.append(entry[3])
        else:
            hashes.append(None)
            unknown.append((i, FileStat.of(result)))
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL
        contents = list(pool.map(_hash, (files[i] for i, _ in unknown)))
    for (i, _), content in zip(unknown, contents, strict=True):
        hashes[i] = content
    cache.remember_hashes(
        (display_name(files[i].path), stat, content)
        for (i, stat), content in zip(unknown, contents, strict=True)
        if len(content) == 64
    )
    digest = hashlib.sha256()
    for file, content_hash in zip(files, hashes, strict=True):
        digest.update(f"{file.relative}\t{content_hash}\n".encode())
    return {
        "classes": class_folders(root),
        "files": len(files),
        "bytes": total,
        "skipped": dict(sorted(skipped.items())),
        "sha256": digest.hexdigest(),
    }


def fingerprint_sources(
    sources: Sources, cache_folder: Path, root: Path = Path(".")
) -> dict[str, dict[str, Any]]:
    """``{role: {"uri": ..., **fingerprint}}`` of every role's source (see :func:`fingerprint`),
    hashes kept in ingest's cache under ``cache_folder``: what the ``scan`` stage writes.
    Relative paths are relative to ``root``, the project folder.

    Raises ParamsError naming the key when a source folder does not exist (only that: the
    ingest stage checks the rest), and OSError when one cannot be listed.
    """
    missing = [
        (
            f"ingest.sources.{role}.uri",
            f"source folder {str(uri)!r} does not exist or is not a folder",
        )
        for role in ROLES
        if not (root / (uri := sources.for_role(role).uri)).is_dir()
    ]
    if missing:
        raise ParamsError(describe_problems("params", missing))
    with VerifyCache(root / cache_folder) as cache:
        found: dict[str, dict[str, Any]] = {}
        for role in ROLES:
            uri = sources.for_role(role).uri
            found[role] = {"uri": str(uri), **fingerprint(root / uri, cache)}
        return found


def _hash(file: SourceFile) -> str:
    try:
        return file_sha256(Path(file.path))
    except OSError as error:
        return f"unreadable: {error.strerror}"
