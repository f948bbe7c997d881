"""What a source folder holds: the files graft considers, in a stable order, and what it skips.

Layout: ``<root>/<class name>/<any sub-folders>/<image file>``. Hidden and system files are
skipped and counted; every other file under a class folder is a :class:`SourceFile` that
verification gives a verdict.

graft and DVC must agree on what a source holds, or a change DVC does not see leaves a stale
model. Both follow linked files and neither follows a linked folder, so a class folder that is
a link is not a class here. What would still make them disagree, or stop DVC outright, is
found by :func:`untrackable` for the checks to refuse before any work. DVC hashes more than
graft reads (hidden files, files beside the class folders): that only re-runs ingest for
nothing, never leaves it stale.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "icon\r"})


def display_name(name: str | Path) -> str:
    """A file name as printable UTF-8 text; bytes that are not UTF-8 show as ``\\xNN``."""
    if isinstance(name, str) and name.isascii():
        return name  # nearly every name, and called once per file: skip the round trip
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


class SourceFile(NamedTuple):
    """A file found under a class folder: its OS path, its printable relative path and label.

    A named tuple, not a dataclass: a scan makes one per file, and at 250,000 files a frozen
    dataclass's construction was a tenth of a no-op ``dvc repro``.
    """

    path: str  # absolute, as the OS names it
    relative: str  # relative to the source root, forward slashes, printable
    label: str


def scan_folder(root: Path) -> tuple[list[SourceFile], Counter[str]]:
    """Every file under ``root``'s class folders in a stable order, plus counts of skipped files.

    The order is by the raw bytes of each name, so it never depends on the disk or the locale.
    Linked folders are not followed, neither as class folders nor inside one: links can loop,
    and DVC does not hash a linked folder's files. A dangling link is a file (verification
    finds it unreadable). Raises OSError when ``root`` cannot be listed.
    """
    # Plain strings rather than Path objects: on 25,000 files pathlib's overhead was most of
    # an incremental run.
    skipped: Counter[str] = Counter()
    found: list[SourceFile] = []
    base = os.path.abspath(root)
    for entry in _sorted_entries(base):
        reason = _not_a_class(entry)
        if reason:
            skipped[reason] += 1
        else:
            _walk_files(entry.path, len(base) + 1, display_name(entry.name), found, skipped)
    return found, skipped


def files_under(root: Path) -> tuple[list[SourceFile], Counter[str]]:
    """Every file under ``root`` at any depth, with no class level (label ""), by
    :func:`scan_folder`'s rules: the same order, hidden and system files skipped and counted,
    linked folders not followed. Relative paths are relative to ``root``. Raises OSError when
    ``root`` cannot be listed.
    """
    skipped: Counter[str] = Counter()
    found: list[SourceFile] = []
    base = os.path.abspath(root)
    _walk_files(base, len(base) + 1, "", found, skipped)
    return found, skipped


def class_folders(root: Path) -> list[str]:
    """The class names of ``root``: its folders that :func:`scan_folder` reads, printable.

    In the same order as scan_folder's labels; an empty class folder is listed too (it yields
    no files). Raises OSError when ``root`` cannot be listed.
    """
    entries = _sorted_entries(os.path.abspath(root))
    return [display_name(entry.name) for entry in entries if _not_a_class(entry) is None]


def _not_a_class(entry: os.DirEntry[str]) -> str | None:
    """Why an entry directly under the source root is not a class folder; None when it is."""
    if _is_hidden(entry.name):
        return "hidden or system file"
    if _is_linked_folder(entry):
        return "linked folder, not followed"  # DVC does not hash it; the checks refuse it
    if not entry.is_dir(follow_symlinks=False):
        return "file outside a class folder"
    return None


def _is_linked_folder(entry: os.DirEntry[str]) -> bool:
    # os.path.isdir, not entry.is_dir(): a link that loops makes is_dir raise; isdir says False,
    # so the link stays a file that verification finds unreadable.
    return entry.is_symlink() and os.path.isdir(entry.path)


def _sorted_entries(folder: str) -> list[os.DirEntry[str]]:
    # Sorted by the raw bytes of the name, so the order never depends on the disk or locale.
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name.encode("utf-8", "surrogateescape"))


def _walk_files(
    folder: str, prefix: int, label: str, found: list[SourceFile], skipped: Counter[str]
) -> None:
    # ``prefix``: length of "<root>/", so a relative path is a slice, not an os.path.relpath.
    for entry in _sorted_entries(folder):
        if _is_hidden(entry.name):
            skipped["hidden or system file"] += 1
        elif entry.is_dir(follow_symlinks=False):
            _walk_files(entry.path, prefix, label, found, skipped)
        elif _is_linked_folder(entry):
            skipped["linked folder, not followed"] += 1  # links can loop
        else:
            relative = display_name(entry.path[prefix:].replace(os.sep, "/"))
            found.append(SourceFile(entry.path, relative, label))


def untrackable(root: Path) -> list[str]:
    """What under ``root`` DVC cannot track, or would see differently from graft: one message
    per path, naming it (printable, see :func:`display_name`) with the reason and the remedy.

    - a name that is not valid UTF-8, anywhere: ``dvc repro`` fails before any stage with an
      encoding error naming nothing (the folder's contents are not listed again);
    - a class folder that is a symbolic link to a folder: DVC does not hash a linked folder's
      files, so a change there would never re-run ingest (graft does not read it either);
    - a symbolic link whose target is missing or loops, anywhere: DVC stops on it;
    - a folder that cannot be listed: neither can read it.

    Hidden entries count: DVC reads them. Linked folders below the class level are not
    entered, as neither graft nor DVC enters them. Returns the messages in path order, empty
    when there is nothing to fix. One walk with os.scandir that stats only links: 250,000
    files in 100 folders took 0.14 s here (disk cache warm). Raises OSError when ``root``
    itself cannot be listed.
    """
    base = os.path.abspath(root)
    problems: list[tuple[str, str]] = []
    folders = [base]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            if folder == base:
                raise
            problems.append((folder, f"cannot be listed ({error.strerror})"))
            continue
        for entry in entries:
            problem = _entry_problem(entry, is_class_level=folder == base)
            if problem:
                problems.append((entry.path, problem))
            elif entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
    problems.sort(key=lambda problem: os.fsencode(problem[0]))
    return [f"{display_name(path)}: {why}" for path, why in problems]


def _entry_problem(entry: os.DirEntry[str], is_class_level: bool) -> str | None:
    """Why DVC cannot track ``entry`` or would not see what graft sees; None when it can."""
    if not _is_utf8(entry.name):
        return "name is not valid UTF-8, which DVC cannot track: rename it"
    if not entry.is_symlink():
        return None
    target = display_name(os.readlink(entry.path))
    try:
        points_to = os.stat(entry.path)
    except OSError as error:
        return (
            f"symbolic link to {target!r} that cannot be followed ({error.strerror}), "
            "on which DVC stops: remove it or restore its target"
        )
    if is_class_level and stat.S_ISDIR(points_to.st_mode) and not _is_hidden(entry.name):
        return (
            f"class folder is a symbolic link (to {target!r}); DVC does not hash a linked "
            "folder's files, so a change there would never re-run ingest: move or copy the "
            "folder into the source"
        )
    return None  # a link to a file, which graft and DVC both follow; or a hidden one


def _is_utf8(name: str) -> bool:
    if name.isascii():  # nearly every name: no encoding round trip
        return True
    try:
        os.fsencode(name).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Characters that show nothing, beyond the format characters (category Cf, such as U+200B
# ZERO WIDTH SPACE): the rest of Unicode's Default_Ignorable_Code_Point set, which
# unicodedata does not expose (the combining grapheme joiner, Hangul fillers, variation
# selectors).
_IGNORABLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]"
)
_HIDDEN = frozenset({"Cf", "Cc"})  # unicodedata categories: format and control characters


def visible_form(name: str) -> str:
    """``name`` as a person sees it: two names with one visible form look the same.

    NFKC-normalised (composed and decomposed accents, full-width letters, ligatures and
    no-break spaces become their plain forms), without invisible characters (format and
    ignorable ones, controls other than white space), white space runs made one space and
    stripped at the ends. Case is kept: a person sees it.
    """
    folded = _IGNORABLE.sub("", unicodedata.normalize("NFKC", name))
    shown = "".join(c for c in folded if c.isspace() or unicodedata.category(c) not in _HIDDEN)
    return " ".join(shown.split())


def invisible_collisions(labels: Iterable[str]) -> list[tuple[str, ...]]:
    """Groups of distinct ``labels`` with one :func:`visible_form`, such as ``"cat"``,
    ``"cat\\u200b"`` and full-width ``"\\uff43\\uff41\\uff54"``: classes a person would take
    for one.

    Each group is sorted, the groups by their first label; empty when every label looks
    different. Confusable letters of other scripts (Cyrillic ``\\u0430`` for Latin ``a``) are not
    detected: that needs Unicode's confusables table.
    """
    groups: defaultdict[str, set[str]] = defaultdict(set)
    for label in labels:
        groups[visible_form(label)].add(label)
    return sorted(tuple(sorted(group)) for group in groups.values() if len(group) > 1)


def look_alike_message(group: tuple[str, ...]) -> str:
    """The warning for one group of :func:`invisible_collisions`, names escaped so that the
    difference shows (``'cat\\u200b'``)."""
    names = ", ".join(repr(name) for name in group)
    return (
        f"class folders {names} look the same to a person but are {len(group)} different "
        "classes to graft and DVC: rename or merge them unless that is meant"
    )
