"""Verify a folder in ImageFolder layout: one verdict, with its reason, for every file seen.

Layout: ``<root>/<class name>/<any sub-folders>/<image file>``. Hidden and system files are
skipped and counted; everything else gets a record, rejected or accepted. The source folder is
only ever read.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tasks.hashing import sha256_hex
from tasks.imaging import check_image_bytes

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


@dataclass(frozen=True)
class FileRecord:
    """One file of a source and its verdict (a manifest row without the role)."""

    path: str  # relative to the source root, with forward slashes
    label: str
    verdict: str
    reason: str
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None


@dataclass
class FolderReport:
    records: list[FileRecord]
    skipped: Counter[str] = field(default_factory=Counter)  # why files were not considered

    def accepted(self) -> list[FileRecord]:
        return [record for record in self.records if record.verdict == "accepted"]


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def scan_folder(root: Path) -> tuple[list[tuple[Path, str]], Counter[str]]:
    """List (file, label) pairs under ``root`` in a stable order, plus counts of skipped files."""
    skipped: Counter[str] = Counter()
    found: list[tuple[Path, str]] = []
    for entry in sorted(os.scandir(root), key=lambda item: item.name):
        if _is_hidden(entry.name):
            skipped["hidden or system file"] += 1
        elif not entry.is_dir():
            skipped["file outside a class folder"] += 1
        else:
            found.extend((path, entry.name) for path in _walk_files(Path(entry.path), skipped))
    return found, skipped


def _walk_files(folder: Path, skipped: Counter[str]) -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(folder):
        # Prune hidden folders in place and sort so the walk order never depends on the disk.
        subdirectories[:] = sorted(name for name in subdirectories if not _is_hidden(name))
        for name in sorted(files):
            if _is_hidden(name):
                skipped["hidden or system file"] += 1
            else:
                yield Path(directory) / name


def check_file(path: Path, root: Path, label: str, *, min_side: int, max_pixels: int) -> FileRecord:
    """Read one file once, hash it and fully decode it."""
    relative = path.relative_to(root).as_posix()
    try:
        data = path.read_bytes()
    except OSError as error:
        return FileRecord(
            relative, label, "unreadable", f"{type(error).__name__}: {error.strerror}"
        )
    check = check_image_bytes(data, min_side=min_side, max_pixels=max_pixels)
    return FileRecord(
        path=relative,
        label=label,
        verdict=check.verdict,
        reason=check.reason,
        sha256=sha256_hex(data),
        bytes=len(data),
        width=check.width,
        height=check.height,
        mode=check.mode,
        format=check.format,
    )


def resolve_duplicates(records: list[FileRecord]) -> list[FileRecord]:
    """Keep one copy of each accepted content; reject content found under two labels."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.verdict == "accepted" and record.sha256:
            by_hash[record.sha256].append(index)
    resolved = list(records)
    for indices in by_hash.values():
        if len(indices) == 1:
            continue
        labels = sorted({records[i].label for i in indices})
        if len(labels) > 1:
            reason = "same content under classes " + ", ".join(repr(label) for label in labels)
            for i in indices:
                resolved[i] = replace(records[i], verdict="label_conflict", reason=reason)
        else:
            kept = records[indices[0]]  # first in path order, so the choice is reproducible
            for i in indices[1:]:
                reason = f"same content as {kept.path}"
                resolved[i] = replace(records[i], verdict="duplicate", reason=reason)
    return resolved


def verify_folder(root: Path, *, min_side: int, max_pixels: int) -> FolderReport:
    """Verify every file under ``root``; duplicates and label conflicts resolved."""
    files, skipped = scan_folder(root)
    records = [
        check_file(path, root, label, min_side=min_side, max_pixels=max_pixels)
        for path, label in files
    ]
    return FolderReport(resolve_duplicates(records), skipped)
