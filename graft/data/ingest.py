"""The ``ingest`` stage's work: verify every image of every source, store the accepted ones.

Output: ``paths.ingest.dataset`` holds ``manifest.csv`` (every file seen, with its verdict) and
``images/<sha256[:2]>/<sha256>`` (each accepted image's exact bytes, stored once). DVC versions
that folder, so the images behind any past model can be fetched again. Reports for people go to
``paths.ingest.rejected`` (CSV) and ``paths.ingest.summary`` (Markdown).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from graft import atomic
from graft.config.params import ROLES, Ingest
from graft.data import schemas
from graft.data.layout import image_path, manifest_path
from graft.data.reports import class_counts_markdown
from graft.data.verify import CheckSettings, FolderReport, verify_folder
from graft.data.verify_cache import VerifyCache
from graft.errors import GraftError

NOT_COUNTED = ("accepted", "duplicate")  # verdicts that do not use up the rejection budget


class IngestError(GraftError):
    """A source broke its rejection budget."""


def build_manifest(reports: dict[str, FolderReport]) -> pd.DataFrame:
    """The manifest: one row per file of every role's report, in role and path order.

    ``reports`` maps a role to its folder report. Raises TableError when a row breaks the
    manifest schema (for instance an accepted image twice in one role).
    """
    rows = [
        {"role": role, **asdict(record)}
        for role, report in reports.items()
        for record in report.records
    ]
    frame = pd.DataFrame(rows, columns=list(schemas.MANIFEST.columns))
    frame = frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})
    frame["reason"] = frame["reason"].replace("", None)
    return schemas.validate(frame, schemas.MANIFEST, where="ingest")


def check_reject_budget(role: str, report: FolderReport, budget: float) -> None:
    """Fail when too many of a source's files are bad (duplicates are benign, not counted).

    ``budget`` is the largest allowed fraction of the source's files (0 to 1). Raises
    IngestError naming the fraction, the budget's key and the three most common verdicts.
    """
    bad = [r for r in report.records if r.verdict not in NOT_COUNTED]
    seen = len(report.records)
    fraction = len(bad) / seen if seen else 0.0
    if fraction > budget:
        top = Counter(r.verdict for r in bad).most_common(3)
        reasons = ", ".join(f"{verdict}: {count}" for verdict, count in top)
        raise IngestError(
            f"source {role!r}: {fraction:.1%} of {seen} files rejected, over "
            f"ingest.sources.{role}.max_reject_fraction = {budget:.1%} (top reasons: {reasons})"
        )


def summarise(reports: dict[str, FolderReport]) -> dict[str, dict[str, Any]]:
    """Counts per role: files, verdicts, accepted images per class (the metrics file).

    Returns ``{role: {files, accepted, rejected, skipped, classes, verdicts,
    accepted_per_class}}``, ``verdicts`` with every verdict of schemas.VERDICTS (0 when none).
    """
    summary: dict[str, dict[str, Any]] = {}
    for role, report in reports.items():
        verdicts = Counter(record.verdict for record in report.records)
        accepted = report.accepted()
        per_class = Counter(record.label for record in accepted)
        summary[role] = {
            "files": len(report.records),
            "accepted": len(accepted),
            "rejected": len(report.records) - len(accepted),
            "skipped": sum(report.skipped.values()),
            "classes": len(per_class),
            "verdicts": {verdict: verdicts.get(verdict, 0) for verdict in schemas.VERDICTS},
            "accepted_per_class": dict(sorted(per_class.items())),
        }
    return summary


def render_summary(manifest: pd.DataFrame, reports: dict[str, FolderReport]) -> str:
    """The Markdown report: files per class and verdict for each role, and what was skipped.

    ``manifest`` is :func:`build_manifest` of ``reports``. Only verdicts that occur get a column.
    """
    lines = ["# Ingest summary", ""]
    for role, report in reports.items():
        rows = manifest[manifest["role"] == role]
        table = pd.crosstab(rows["label"], rows["verdict"]).reindex(
            columns=[v for v in schemas.VERDICTS if v in set(rows["verdict"])]
        )
        # Only what the data determines: how many files the cache spared is logged, not
        # written, so a run with a warm cache produces the same report as a cold one.
        lines += [f"## {role}", "", f"{len(rows)} files."]
        if report.skipped:
            skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items()))
            lines.append(f"Skipped: {skipped}.")
        lines += ["", class_counts_markdown(table), ""]
    return "\n".join(lines)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` (and its folder) hold ``source``'s bytes: hard-linked when possible (no
    bytes copied), else copied. Raises OSError when neither works."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, target)


def ingest(
    settings: Ingest, dataset: Path, cache_folder: Path
) -> tuple[pd.DataFrame, dict[str, FolderReport]]:
    """Verify all sources and write ``dataset`` (images by hash + manifest) atomically.

    Sources are verified in role order with the verdict cache under ``cache_folder``. Returns
    the manifest and each role's folder report. Raises IngestError when a source breaks its
    rejection budget, before anything is written; ``dataset`` is then left as it was.
    """
    check = CheckSettings(min_side=settings.min_side, max_pixels=settings.max_pixels)
    reports: dict[str, FolderReport] = {}
    with VerifyCache(cache_folder) as cache:
        for role in ROLES:
            source = settings.sources.for_role(role)
            reports[role] = verify_folder(
                source.uri, check, cache=cache, workers=settings.workers, what=f"verify {role}"
            )
            check_reject_budget(role, reports[role], source.max_reject_fraction)
        manifest = build_manifest(reports)
        with atomic.atomic_path(dataset, directory=True) as staging:
            for sha256 in sorted(set(manifest.loc[manifest["verdict"] == "accepted", "sha256"])):
                link_or_copy(cache.object_path(sha256), image_path(staging, sha256))
            manifest.to_csv(manifest_path(staging), index=False, lineterminator="\n")
    return manifest, reports
