"""The ``ingest`` stage's work: verify every image of every source, store the accepted ones.

Output: ``paths.ingest.dataset`` holds ``manifest.csv`` (every file seen, with its verdict) and
the image store (graft.data.store: each accepted image's exact bytes, once, in shards that
later ingests keep as they are). DVC versions that folder, so the images behind any past model
can be fetched again. Reports for people go to
``paths.ingest.rejected`` (CSV) and ``paths.ingest.summary`` (Markdown).

The class folders a user laid out are a contract: one that ends with no accepted image fails
the stage (``ingest.lost_class: fail``), or is left out and reported (``warn``); it never
vanishes silently.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from graft import atomic
from graft.config.params import ROLES, Ingest, Role
from graft.data import schemas
from graft.data.layout import manifest_path
from graft.data.reports import class_counts_markdown
from graft.data.sources import class_folders, invisible_collisions, look_alike_message
from graft.data.store import pack
from graft.data.verify import CheckSettings, FileRecord, FolderReport, verify_folder
from graft.data.verify_cache import VerifyCache
from graft.errors import GraftError

NOT_COUNTED = ("accepted", "duplicate")  # verdicts that do not use up the rejection budget


class IngestError(GraftError):
    """A source broke its rejection budget, or lost a class with ``ingest.lost_class: fail``."""


@dataclass(frozen=True)
class SourceReport:
    """What ingesting one role's source found: its folder report, the class folders that
    ended with no accepted image (class name -> why, in class order) and the groups of class
    names that look the same to a person (see graft.data.sources.invisible_collisions)."""

    folder: FolderReport
    lost: dict[str, str]
    look_alike: list[tuple[str, ...]]


def build_manifest(reports: dict[str, SourceReport]) -> pd.DataFrame:
    """The manifest: one row per file of every role's report, in role and path order.

    ``reports`` maps a role to its report. Raises TableError when a row breaks the manifest
    schema (for instance an accepted image twice in one role).
    """
    # Rows as plain tuples (records are named tuples): asdict() per record deep-copied every
    # field, which at 250,000 files was most of an incremental ingest.
    rows = [(role, *record) for role, report in reports.items() for record in report.folder.records]
    frame = pd.DataFrame(rows, columns=["role", *FileRecord._fields])
    frame = frame[list(schemas.MANIFEST.columns)]
    frame = frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})
    frame["reason"] = frame["reason"].replace("", None)
    return schemas.validate(frame, schemas.MANIFEST, where="ingest")


def budget_rejections(report: FolderReport) -> list[FileRecord]:
    """The records of a source that use up its rejection budget: every verdict but
    ``accepted`` and ``duplicate`` (a second copy of an accepted file is benign), in path
    order."""
    return [record for record in report.records if record.verdict not in NOT_COUNTED]


def rejected_fraction(report: FolderReport) -> float:
    """The fraction (0 to 1) of a source's files that :func:`budget_rejections` counts; 0 for
    a source with no file. Skipped files are not among its files."""
    seen = len(report.records)
    return len(budget_rejections(report)) / seen if seen else 0.0


def check_reject_budget(role: str, report: FolderReport, budget: float) -> None:
    """Fail when too many of a source's files are bad (duplicates are benign, not counted).

    ``budget`` is the largest allowed fraction of the source's files (0 to 1). Raises
    IngestError naming the fraction, the budget's key and the three most common verdicts.
    """
    fraction = rejected_fraction(report)
    if fraction > budget:
        top = Counter(r.verdict for r in budget_rejections(report)).most_common(3)
        reasons = ", ".join(f"{verdict}: {count}" for verdict, count in top)
        raise IngestError(
            f"source {role!r}: {fraction:.1%} of {len(report.records)} files rejected, over "
            f"ingest.sources.{role}.max_reject_fraction = {budget:.1%} (top reasons: {reasons})"
        )


def lost_classes(classes: list[str], records: list[FileRecord]) -> dict[str, str]:
    """Each of ``classes`` (class folder names) with no accepted record, and why, in order.

    ``records`` are a folder's records. The reason is ``no files to verify ...`` for a folder
    with nothing graft reads, else how many files were rejected and for what, most common
    verdict first. Returns an empty dict when every class kept an image.
    """
    verdicts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        verdicts[record.label][record.verdict] += 1
    return {name: _why_lost(verdicts[name]) for name in classes if not verdicts[name]["accepted"]}


def _why_lost(verdicts: Counter[str]) -> str:
    total = sum(verdicts.values())
    if not total:
        return "no files to verify (empty, or only hidden files and linked folders)"
    counts = ", ".join(f"{verdict}: {n}" for verdict, n in verdicts.most_common())
    files = "its only file" if total == 1 else f"all {total} files"
    return f"{files} rejected ({counts})"


def check_lost_classes(role: str, lost: dict[str, str], setting: str) -> None:
    """Fail when a class folder of ``role`` kept no image and ``ingest.lost_class`` is
    ``fail`` (``setting``); with ``warn``, do nothing (the reports list them).

    ``lost`` is :func:`lost_classes`. Raises IngestError naming every lost class and why.
    """
    if not lost or setting == "warn":
        return
    listed = "; ".join(f"{name!r}: {why}" for name, why in lost.items())
    raise IngestError(
        f"source {role!r}: {len(lost)} class folder(s) with no accepted image, which the model "
        f"would silently lack: {listed}. Add images to them, remove them, or set "
        "ingest.lost_class: warn to go on without them"
    )


def summarise(reports: dict[str, SourceReport]) -> dict[str, dict[str, Any]]:
    """Counts per role: files, verdicts, accepted images per class (the metrics file).

    Returns ``{role: {files, accepted, rejected, duplicates, rejected_fraction, skipped,
    classes, lost_classes, verdicts, accepted_per_class, accepted_with_warning}}``: ``files``
    is every file verified (accepted + rejected + duplicates; skipped files are not among
    them), ``rejected`` the files whose verdict is an error (what the rejection budget counts;
    duplicates are counted apart, as ``duplicates``), ``rejected_fraction`` their fraction of
    ``files`` (0 to 1), ``classes`` the classes that kept an image, ``lost_classes`` the class
    folders that kept none; ``verdicts`` holds every verdict of schemas.VERDICTS (0 when none).
    """
    summary: dict[str, dict[str, Any]] = {}
    for role, report in reports.items():
        records = report.folder.records
        verdicts = Counter(record.verdict for record in records)
        accepted = report.folder.accepted()
        per_class = Counter(record.label for record in accepted)
        summary[role] = {
            "files": len(records),
            "accepted": len(accepted),
            "rejected": len(budget_rejections(report.folder)),
            "duplicates": verdicts.get("duplicate", 0),
            "rejected_fraction": rejected_fraction(report.folder),
            "skipped": sum(report.folder.skipped.values()),
            "classes": len(per_class),
            "lost_classes": len(report.lost),
            "accepted_with_warning": sum(1 for record in accepted if record.reason),
            "verdicts": {verdict: verdicts.get(verdict, 0) for verdict in schemas.VERDICTS},
            "accepted_per_class": dict(sorted(per_class.items())),
        }
    return summary


def warnings_of(report: SourceReport) -> list[str]:
    """What a person should look at in one role's report: each lost class (only reported
    with ``ingest.lost_class: warn``), each group of look-alike class names, and each
    accepted image that came with a warning (an EXIF orientation not applied, a high bit
    depth that collapsed)."""
    lost = [
        f"class {name!r} has no accepted image and is left out: {why}"
        for name, why in report.lost.items()
    ]
    accepted = [f"{r.path}: {r.reason}" for r in report.folder.accepted() if r.reason]
    return lost + [look_alike_message(group) for group in report.look_alike] + accepted


def render_summary(
    manifest: pd.DataFrame, reports: dict[str, SourceReport], settings: Ingest, rejected: Path
) -> str:
    """The Markdown report: totals per role (files seen, accepted, rejected, duplicates apart,
    skipped), each source's rejected fraction against its budget (``settings``), where the
    list of ``rejected`` files is, then per role files per class and verdict, what was skipped
    and why, and warnings (lost classes, look-alike class names).

    ``manifest`` is :func:`build_manifest` of ``reports``; ``rejected`` is the path of the CSV
    of every file not accepted, as the reader should find it (relative to the project root).
    Only verdicts that occur get a column in a class table.
    """
    counts = summarise(reports)
    budgets: dict[str, float] = {
        role: settings.sources.for_role(role).max_reject_fraction for role in ROLES
    }
    lines = ["# Ingest summary", "", *_totals(counts), ""]
    for role in reports:
        lines.append(f"- {_budget_line(role, counts[role], budgets[role])}")
    lines += [
        "",
        "A duplicate is the same content as an accepted file of its class: one copy is kept, "
        "and it is not an error, so it does not count against the budget. Skipped files "
        "(hidden or system files, linked folders, files outside a class folder) are not read "
        "and not among the files seen.",
        "",
        f"Every rejected and duplicate file, with its verdict and reason: `{rejected}`.",
        "",
    ]
    for role, report in reports.items():
        rows = manifest[manifest["role"] == role]
        present = set(rows["verdict"].unique())  # once: a set per verdict was seconds at 250,000
        table = pd.crosstab(rows["label"], rows["verdict"]).reindex(
            columns=[v for v in schemas.VERDICTS if v in present]
        )
        # Only what the data determines: how many files the cache spared is logged, not
        # written, so a run with a warm cache produces the same report as a cold one.
        role_counts = counts[role]
        lines += [
            f"## {role}",
            "",
            f"{role_counts['files']} files seen: {role_counts['accepted']} accepted, "
            f"{role_counts['rejected']} rejected, {_duplicates(role_counts['duplicates'])}.",
        ]
        skipped = report.folder.skipped
        if skipped:
            listed = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
            lines.append(f"Skipped: {listed}.")
        else:
            lines.append("Skipped: none.")
        lines += ["", class_counts_markdown(table), ""]
        warnings = warnings_of(report)
        if warnings:
            lines += [*(f"- Warning: {warning}" for warning in warnings), ""]
    return "\n".join(lines)


def _totals(counts: dict[str, dict[str, Any]]) -> list[str]:
    """The summary's totals table: one row per role (``counts`` is :func:`summarise`'s)."""
    columns = {
        "files seen": "files",
        "accepted": "accepted",
        "rejected": "rejected",
        "duplicates": "duplicates",
        "skipped": "skipped",
    }
    table = pd.DataFrame(
        {header: [counts[role][key] for role in counts] for header, key in columns.items()},
        index=list(counts),
    )
    return class_counts_markdown(table, index="role").splitlines()


def _budget_line(role: str, counts: dict[str, Any], budget: float) -> str:
    """One source's rejected fraction against its budget, for people: ``counts`` is its
    :func:`summarise` entry and ``budget`` its ``max_reject_fraction`` (0 to 1)."""
    verdict = "within" if counts["rejected_fraction"] <= budget else "over"
    return (
        f"{role}: rejected {counts['rejected']} of {counts['files']} files "
        f"({counts['rejected_fraction']:.1%}); budget {budget:.1%} "
        f"(`ingest.sources.{role}.max_reject_fraction`): {verdict}"
    )


def _duplicates(count: int) -> str:
    """How many duplicates, saying that each was kept once when there are any."""
    return "0 duplicates" if count == 0 else f"{count} duplicate{'s' * (count > 1)} (kept once)"


def ingest(
    settings: Ingest, dataset: Path, cache_folder: Path
) -> tuple[pd.DataFrame, dict[str, SourceReport]]:
    """Verify all sources and write ``dataset`` (image store + manifest) atomically.

    Sources are verified in role order with the verdict cache under ``cache_folder``. The
    shards of the ``dataset`` already there are kept where they still hold accepted images
    (graft.data.store.pack; DVC keeps the folder between runs: ``persist``). Returns
    the manifest and each role's report. Raises IngestError when a source breaks its
    rejection budget, or loses a class folder with ``ingest.lost_class: fail``, before
    anything is written; ``dataset`` is then left as it was.
    """
    check = CheckSettings.of(settings)
    reports: dict[str, SourceReport] = {}
    with VerifyCache(cache_folder) as cache:
        for role in ROLES:
            reports[role] = _ingest_source(role, settings, check, cache)
        manifest = build_manifest(reports)
        accepted = manifest[manifest["verdict"] == "accepted"]
        sizes = dict(zip(accepted["sha256"], accepted["bytes"].astype(int), strict=True))
        previous = dataset if dataset.is_dir() else None
        with atomic.atomic_path(dataset, directory=True) as staging:
            packing = pack(
                staging, sizes, previous, lambda sha: cache.object_path(sha).read_bytes()
            )
            manifest.to_csv(manifest_path(staging), index=False, lineterminator="\n")
    print(
        f"ingest: {len(sizes)} images stored; {len(packing.kept)} shard(s) kept as they were, "
        f"{len(packing.written)} written ({packing.packed} images), {len(packing.dropped)} "
        "dropped",
        file=sys.stderr,
    )
    return manifest, reports


def _ingest_source(
    role: Role, settings: Ingest, check: CheckSettings, cache: VerifyCache
) -> SourceReport:
    """Verify one role's source and hold it to its rejection budget and its classes."""
    source = settings.sources.for_role(role)
    # Listed before verifying: a class folder removed meanwhile is lost, as it should be.
    classes = class_folders(source.uri)
    folder = verify_folder(
        source.uri, check, cache=cache, workers=settings.workers, what=f"verify {role}"
    )
    check_reject_budget(role, folder, source.max_reject_fraction)
    lost = lost_classes(classes, folder.records)
    check_lost_classes(role, lost, settings.lost_class)
    return SourceReport(folder, lost, invisible_collisions(classes))
