"""Verify a folder in ImageFolder layout: one verdict, with its reason, for every file seen.

Layout: ``<root>/<class name>/<any sub-folders>/<image file>``. Hidden and system files are
skipped and counted; everything else gets a record, rejected or accepted. The source folder is
only ever read. Files are checked in parallel in worker processes, each file under a memory
and time budget (graft.data.budget); with a :class:`VerifyCache`, a
file whose size, mtime and inode are unchanged (or whose content was judged before under the
same settings) is not decoded again.
"""

from __future__ import annotations

import os
import signal
import stat as stat_module
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from graft.config.settings import (
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_PNG_MAX_TEXT_CHUNK,
    DEFAULT_PNG_MAX_TEXT_MEMORY,
    Ingest,
)
from graft.data.budget import Budget, Outcome, map_budgeted
from graft.data.decoding import PillowLimits, configure_pillow
from graft.data.image_check import ImageCheck, check_image_bytes, decode_checked
from graft.data.sources import SourceFile, display_name, scan_folder
from graft.data.verify_cache import FileStat, VerifyCache, store_object
from graft.hashing import file_sha256, sha256_hex
from graft.progress import Progress

# Bump when check_image_bytes would judge some bytes differently: old cached verdicts expire.
CHECKER_VERSION = 3  # 3: training's decode path, checksums, unsupported, budgets, phash
CHUNK = 64  # files per cache lookup batch and progress step


@dataclass(frozen=True)
class CheckSettings:
    """The limits behind the verdicts, as ``ingest.*`` sets them.

    ``min_side`` (pixels) is behind ``too_small``; ``max_pixels`` (width x height), the PNG
    text limits (bytes, :class:`graft.data.decoding.PillowLimits`) and ``decode_memory_mb``
    (MiB per decoding process) behind ``too_large``; ``decode_timeout_s`` (seconds per file)
    behind ``timeout``.
    """

    min_side: int
    max_pixels: int
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY_MB
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    png_max_text_chunk: int = DEFAULT_PNG_MAX_TEXT_CHUNK
    png_max_text_memory: int = DEFAULT_PNG_MAX_TEXT_MEMORY

    @classmethod
    def of(cls, ingest: Ingest) -> CheckSettings:
        """The settings of params.yaml's ``ingest`` section."""
        return cls(
            ingest.min_side, ingest.max_pixels, ingest.decode_memory_mb, ingest.decode_timeout_s,
            ingest.png_max_text_chunk, ingest.png_max_text_memory,
        )  # fmt: skip

    def limits(self) -> PillowLimits:
        """Pillow's limits for the decoding processes."""
        return PillowLimits(self.max_pixels, self.png_max_text_chunk, self.png_max_text_memory)

    def key(self) -> str:
        """A string that identifies the verdicts these settings give, for the cache.

        The time limit is not in it: ``timeout`` verdicts depend on the machine's load, so
        they are never cached.
        """
        return (
            f"v{CHECKER_VERSION}:min_side={self.min_side}:{self.limits().key()}"
            f":decode_memory_mb={self.decode_memory_mb}"
        )


class FileRecord(NamedTuple):
    """One file of a source and its verdict (a manifest row without the role).

    ``bytes`` is the file's size in bytes; width and height (pixels), mode and format come
    from its header. Everything after ``reason`` is None when the file could not be read (and
    the header facts when it is not an image). A named tuple, not a dataclass: a re-run makes
    one per file from the cache, and the manifest is built from them as rows; at 250,000 files
    a frozen dataclass cost seconds of an incremental ingest.
    """

    path: str  # relative to the source root, forward slashes, printable (see display_name)
    label: str
    verdict: str
    reason: str
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    phash: str | None = None  # accepted images: 64-bit perceptual hash, 16 hex digits

    @classmethod
    def of(cls, path: str, label: str, sha256: str, size: int, check: ImageCheck) -> FileRecord:
        """The record of a file that was read: its hash, size in bytes and check result."""
        return cls(
            path, label, check.verdict, check.reason, sha256, size,
            check.width, check.height, check.mode, check.format, check.phash,
        )  # fmt: skip


@dataclass
class FolderReport:
    """What verifying one folder found: a record per file (in path order), the counts of files
    skipped by reason, and how many files were actually decoded in this run."""

    records: list[FileRecord]
    skipped: Counter[str] = field(default_factory=Counter)  # why files were not considered
    decoded: int = 0  # files actually read and decoded in this run (the rest came from cache)

    def accepted(self) -> list[FileRecord]:
        """The records with verdict ``accepted``, in path order."""
        return [record for record in self.records if record.verdict == "accepted"]


@dataclass(frozen=True)
class _Task:
    file: SourceFile
    settings: CheckSettings
    objects: Path | None  # where accepted bytes go; None when nothing is to be stored


def _start_worker(limits: PillowLimits) -> None:
    configure_pillow(limits)


def _check(task: _Task) -> tuple[FileRecord, FileStat | None]:
    """Read one file once: hash it, decode it as training will, store its bytes if accepted.

    Runs in a worker process under the memory budget: a decode that needs more is
    ``too_large``, naming the budget.
    """
    file, settings = task.file, task.settings
    data, stat = read_file(file, settings)
    if isinstance(data, FileRecord):  # not read: why is its verdict
        return data, stat
    sha256 = sha256_hex(data)
    check, _ = judge_bytes(data, settings)
    if check.verdict == "accepted" and task.objects is not None:
        store_object(task.objects, sha256, data)
    return FileRecord.of(file.relative, file.label, sha256, len(data), check), stat


def judge_bytes(
    data: bytes, settings: CheckSettings, size: int | None = None
) -> tuple[ImageCheck, np.ndarray | None]:
    """The verdict on a file's ``data`` under ``settings`` and, with ``size``, an accepted
    image's (size, size, 3) uint8 pixels as training decodes them (graft.data.image_check:
    :func:`check_image_bytes`, :func:`decode_checked`). Running out of the memory budget
    mid-decode is ``too_large``, naming the budget. Raises nothing."""
    limits = {"min_side": settings.min_side, "max_pixels": settings.max_pixels}
    try:
        if size is None:
            return check_image_bytes(data, **limits), None
        return decode_checked(data, **limits, size=size)
    except MemoryError:
        return ImageCheck("too_large", over_memory(settings)), None


def read_file(
    file: SourceFile, settings: CheckSettings
) -> tuple[bytes | FileRecord, FileStat | None]:
    """``(data, stat)``: the bytes of ``file`` and its stat; or, when they must not or cannot
    be read, a record saying why instead of the bytes: ``unreadable`` (an OS error, a dangling
    link, a named pipe or device: reading would block) or ``too_large`` (more bytes than
    ``settings.decode_memory_mb``; never read into memory, hashed streamed). ``stat`` is None
    when the file could not be stat'ed as a regular file. Raises nothing.
    """
    try:
        status = os.stat(file.path)
        if not stat_module.S_ISREG(status.st_mode):  # a named pipe would block the reader
            reason = "not a regular file (a named pipe, socket or device)"
            return FileRecord(file.relative, file.label, "unreadable", reason), None
        stat = FileStat.of(status)
        if status.st_size > settings.decode_memory_mb * 1024 * 1024:  # never read into memory
            reason = f"the file ({status.st_size} bytes) is larger than {_budget(settings)}"
            record = FileRecord(file.relative, file.label, "too_large", reason)
            digest = file_sha256(Path(file.path))
            return record._replace(sha256=digest, bytes=status.st_size), stat
        with open(file.path, "rb") as stream:
            return stream.read(), stat
    except OSError as error:
        reason = _unreadable(file, error)
        return FileRecord(file.relative, file.label, "unreadable", reason), None


def _unreadable(file: SourceFile, error: OSError) -> str:
    if os.path.islink(file.path) and not os.path.exists(file.path):
        return f"dangling symbolic link to {display_name(os.readlink(file.path))}"
    return f"{type(error).__name__}: {error.strerror}"


def _budget(settings: CheckSettings) -> str:
    return f"ingest.decode_memory_mb = {settings.decode_memory_mb} MiB"


def over_memory(settings: CheckSettings) -> str:
    """The reason of a ``too_large`` verdict given when decoding ran out of the memory budget."""
    return (
        f"decoding needs more than {_budget(settings)} "
        "(a frame, tile or embedded image larger than the header says)"
    )


def lost_record(file: SourceFile, settings: CheckSettings, outcome: Outcome[Any]) -> FileRecord:
    """The record of ``file``, whose check ended as ``outcome`` without a result: it ran out
    of time (``timeout``), or its process was killed (``too_large``: the kernel's OOM
    killer) or crashed (``corrupt``). Hashes the file, streamed, so a report can name its
    content; raises nothing."""
    if outcome.timed_out:
        limit = settings.decode_timeout_s
        verdict, reason = (
            "timeout",
            f"decoding took longer than ingest.decode_timeout_s = {limit:g} s",
        )
    elif outcome.exit_code == -signal.SIGKILL:  # what the kernel's OOM killer sends
        verdict, reason = "too_large", over_memory(settings) + "; its process was killed"
    else:
        verdict, reason = (
            "corrupt",
            f"the decoder crashed its process (exit code {outcome.exit_code})",
        )
    try:  # hashed here, streamed, so the report can name the content; no decode again
        size, sha256 = os.stat(file.path).st_size, file_sha256(Path(file.path))
    except OSError:
        return FileRecord(file.relative, file.label, verdict, reason)
    return FileRecord(file.relative, file.label, verdict, reason, sha256, size)


def _run_checks(
    tasks: list[_Task], settings: CheckSettings, workers: int, what: str
) -> list[tuple[FileRecord, FileStat | None]]:
    # Processes, not threads: only a process can be given a memory cap and be stopped in the
    # middle of a C decoder (graft.data.budget).
    budget = Budget(settings.decode_memory_mb, settings.decode_timeout_s)
    results: list[tuple[FileRecord, FileStat | None] | None] = [None] * len(tasks)
    with Progress(len(tasks), what) as progress:
        outcomes = map_budgeted(
            _check, tasks, budget, workers=min(workers, len(tasks)),
            initializer=_start_worker, initargs=(settings.limits(),),
        )  # fmt: skip
        for index, outcome in outcomes:
            if outcome.result is None:  # timed out, or its process died
                results[index] = (lost_record(tasks[index].file, settings, outcome), None)
            else:
                results[index] = outcome.result
            progress.update()
    return [result for result in results if result is not None]


def resolve_duplicates(records: list[FileRecord]) -> list[FileRecord]:
    """Keep one copy of each accepted content; reject content found under two labels.

    Returns ``records`` in the same order: of the accepted records sharing a sha256 under one
    label, all but the first become ``duplicate``; under several labels, all become
    ``label_conflict``. Other records are unchanged.
    """
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
                resolved[i] = records[i]._replace(verdict="label_conflict", reason=reason)
        else:
            kept = records[indices[0]]  # first in path order, so the choice is reproducible
            for i in indices[1:]:
                reason = f"same content as {kept.path}"
                resolved[i] = records[i]._replace(verdict="duplicate", reason=reason)
    return resolved


def default_workers() -> int:
    """The number of cores this process may run on (at least 1)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def verify_folder(
    root: Path,
    settings: CheckSettings,
    *,
    cache: VerifyCache | None = None,
    workers: int = 0,
    what: str = "verify",
) -> FolderReport:
    """Verify every file under ``root``; duplicates and label conflicts resolved.

    ``settings`` are the limits of the checks; ``workers`` is the number of processes, 0 for one
    per available core; ``what`` labels the progress bar. With ``cache``, accepted bytes are
    kept in its object store and unchanged files are not read again. A file that cannot be
    read gets the verdict ``unreadable``; only a ``root`` that cannot be listed raises OSError.
    """
    files, skipped = scan_folder(root)
    key = settings.key()
    records: list[FileRecord | None] = [None] * len(files)
    pending: list[tuple[int, _Task]] = []
    objects = cache.objects if cache is not None else None
    for index, file in enumerate(files):
        reused = _from_cache(cache, file, key)
        if reused is not None:
            records[index] = reused
        else:
            pending.append((index, _Task(file, settings, objects)))
    tasks = [task for _, task in pending]
    results = _run_checks(tasks, settings, workers or default_workers(), what) if tasks else []
    for (index, _), (record, _) in zip(pending, results, strict=True):
        records[index] = record
    if cache is not None:
        cache.remember(
            key,
            (
                (display_name(task.file.path), stat, record.sha256, _as_check(record))
                for (_, task), (record, stat) in zip(pending, results, strict=True)
                if stat is not None and record.sha256 is not None and record.verdict != "timeout"
            ),
        )
    complete = [record for record in records if record is not None]
    return FolderReport(resolve_duplicates(complete), skipped, decoded=len(pending))


def _from_cache(cache: VerifyCache | None, file: SourceFile, key: str) -> FileRecord | None:
    if cache is None:
        return None
    try:
        stat = FileStat.of(os.stat(file.path))
    except OSError:
        return None  # let the real check report why it cannot be read
    sha256 = cache.known_hash(display_name(file.path), stat)
    check = cache.known_verdict(sha256, key) if sha256 else None
    if sha256 is None or check is None:
        return None
    return FileRecord.of(file.relative, file.label, sha256, stat.size, check)


def _as_check(record: FileRecord) -> ImageCheck:
    return ImageCheck(
        record.verdict, record.reason, record.width, record.height, record.mode, record.format,
        record.phash,
    )  # fmt: skip
