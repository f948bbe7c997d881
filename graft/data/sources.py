"""What a source folder holds: the files graft considers, in a stable order, and what it skips.

Layout: ``<root>/<class name>/<any sub-folders>/<image file>``. Hidden and system files are
skipped and counted; every other file under a class folder is a :class:`SourceFile` that
verification gives a verdict.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


def display_name(name: str | Path) -> str:
    """A file name as printable UTF-8 text; bytes that are not UTF-8 show as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


@dataclass(frozen=True)
class SourceFile:
    """A file found under a class folder: its OS path, its printable relative path and label."""

    path: str  # absolute, as the OS names it
    relative: str  # relative to the source root, forward slashes, printable
    label: str


def scan_folder(root: Path) -> tuple[list[SourceFile], Counter[str]]:
    """Every file under ``root``'s class folders in a stable order, plus counts of skipped files.

    The order is by the raw bytes of each name, so it never depends on the disk or the locale.
    Linked folders inside a class folder are not followed (links can loop). Raises OSError
    when ``root`` cannot be listed.
    """
    # Plain strings rather than Path objects: on 25,000 files pathlib's overhead was most of
    # an incremental run.
    skipped: Counter[str] = Counter()
    found: list[SourceFile] = []
    base = os.path.abspath(root)
    for entry in _sorted_entries(base):
        if _is_hidden(entry.name):
            skipped["hidden or system file"] += 1
        elif not entry.is_dir():
            skipped["file outside a class folder"] += 1
        else:
            _walk_files(entry.path, len(base) + 1, display_name(entry.name), found, skipped)
    return found, skipped


def _sorted_entries(folder: str) -> list[os.DirEntry[str]]:
    # Sorted by the raw bytes of the name, so the order never depends on the disk or locale.
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: os.fsencode(entry.name))


def _walk_files(
    folder: str, prefix: int, label: str, found: list[SourceFile], skipped: Counter[str]
) -> None:
    # ``prefix``: length of "<root>/", so a relative path is a slice, not an os.path.relpath.
    for entry in _sorted_entries(folder):
        if _is_hidden(entry.name):
            skipped["hidden or system file"] += 1
        elif entry.is_dir(follow_symlinks=False):
            _walk_files(entry.path, prefix, label, found, skipped)
        elif entry.is_symlink() and entry.is_dir():
            skipped["linked folder, not followed"] += 1  # links can loop
        else:
            relative = display_name(entry.path[prefix:].replace(os.sep, "/"))
            found.append(SourceFile(entry.path, relative, label))
