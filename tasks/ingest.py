"""Stage ``ingest``: verify every image of every source and store the accepted ones by content.

Output: ``paths.ingest.dataset`` holds ``manifest.csv`` (every file seen, with its verdict) and
``images/<sha256[:2]>/<sha256>`` (each accepted image's exact bytes, stored once). DVC versions
that folder, so the images behind any past model can be fetched again.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from tasks import atomic, schemas
from tasks.config import ROLES, Ingest, Params, load_params
from tasks.errors import GraftError, run_main
from tasks.hashing import sha256_hex
from tasks.ingested import image_path, manifest_path
from tasks.verify import FolderReport, verify_folder


class IngestError(GraftError):
    """A source broke the rejection budget or changed while being ingested."""


def build_manifest(reports: dict[str, FolderReport]) -> pd.DataFrame:
    rows = [
        {"role": role, **asdict(record)}
        for role, report in reports.items()
        for record in report.records
    ]
    columns = list(schemas.MANIFEST.columns)
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({"width": "Int64", "height": "Int64", "bytes": "Int64"})
    frame["reason"] = frame["reason"].replace("", None)
    return schemas.validate(frame, schemas.MANIFEST, where="ingest")


def check_reject_budget(role: str, report: FolderReport, budget: float) -> None:
    """Fail when too many of a source's files are bad (duplicates are benign, not counted)."""
    bad = [r for r in report.records if r.verdict not in ("accepted", "duplicate")]
    seen = len(report.records)
    fraction = len(bad) / seen if seen else 0.0
    if fraction > budget:
        top = Counter(r.verdict for r in bad).most_common(3)
        reasons = ", ".join(f"{verdict}: {count}" for verdict, count in top)
        raise IngestError(
            f"source {role!r}: {fraction:.1%} of {seen} files rejected, over "
            f"ingest.sources.{role}.max_reject_fraction = {budget:.1%} (top reasons: {reasons})"
        )


def describe_counts(counts: dict[str, Any]) -> str:
    rejected = ", ".join(
        f"{v}: {n}" for v, n in counts["verdicts"].items() if n and v != "accepted"
    )
    return (
        f"{counts['files']} files, {counts['accepted']} accepted in {counts['classes']} classes, "
        f"{counts['rejected']} rejected ({rejected or 'none'}), {counts['skipped']} skipped"
    )


def summarise(reports: dict[str, FolderReport]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for role, report in reports.items():
        verdicts = Counter(record.verdict for record in report.records)
        accepted = report.accepted()
        summary[role] = {
            "files": len(report.records),
            "accepted": len(accepted),
            "rejected": len(report.records) - len(accepted),
            "skipped": sum(report.skipped.values()),
            "classes": len({record.label for record in accepted}),
            "verdicts": {verdict: verdicts.get(verdict, 0) for verdict in schemas.VERDICTS},
        }
    return summary


def store_images(source_root: Path, report: FolderReport, dataset: Path) -> None:
    """Copy each accepted image's bytes under its hash, checking the content did not change."""
    for record in report.accepted():
        assert record.sha256 is not None  # accepted records always carry their hash
        data = (source_root / record.path).read_bytes()
        if sha256_hex(data) != record.sha256:
            raise IngestError(
                f"{source_root / record.path} changed while being ingested; run again"
            )
        target = image_path(dataset, record.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def ingest(settings: Ingest, dataset: Path) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Verify all sources, store the accepted images and the manifest in ``dataset``."""
    reports: dict[str, FolderReport] = {}
    for role in ROLES:
        source = settings.sources.for_role(role)
        reports[role] = verify_folder(
            source.uri, min_side=settings.min_side, max_pixels=settings.max_pixels
        )
        check_reject_budget(role, reports[role], source.max_reject_fraction)
    manifest = build_manifest(reports)
    with atomic.atomic_path(dataset, directory=True) as staging:
        for role in ROLES:
            store_images(settings.sources.for_role(role).uri, reports[role], staging)
        manifest.to_csv(manifest_path(staging), index=False, lineterminator="\n")
    return manifest, summarise(reports)


def main() -> None:
    params: Params = load_params()
    paths = params.paths.ingest
    manifest, summary = ingest(params.ingest, paths.dataset)
    rejected = manifest[manifest["verdict"] != "accepted"]
    atomic.write_csv(paths.rejected, rejected)
    atomic.write_json(paths.metrics, summary)
    for role, counts in summary.items():
        print(f"ingest {role}: {describe_counts(counts)}", file=sys.stderr)
    for row in rejected.itertuples():
        print(f"  rejected {row.role}/{row.path}: {row.verdict} ({row.reason})", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
