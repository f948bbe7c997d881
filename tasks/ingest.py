"""Stage ``ingest``: verify every image of every source; store the accepted ones by content.

Reads ``ingest.*`` and ``paths.ingest.*`` from params.yaml, runs :func:`graft.data.ingest.ingest`
and writes the reports beside the dataset (see that module for the layout).
"""

from __future__ import annotations

import sys

from graft import atomic
from graft.config.checks import check_sources
from graft.config.params import DEFAULT_PARAMS, load_params
from graft.data.ingest import ingest, render_summary, summarise, warnings_of
from graft.errors import run_main


def main() -> None:
    """Verify the sources and write ``paths.ingest.*``; run from the project root.

    Raises ParamsError (bad params, a missing source folder, a path DVC cannot track) before
    any work, and IngestError when a source breaks its rejection budget or loses a class with
    ``ingest.lost_class: fail``; nothing is written then. Warnings (lost classes with
    ``warn``, look-alike class names) are printed last and written in the summary.
    """
    params = load_params(DEFAULT_PARAMS)
    check_sources(params, DEFAULT_PARAMS.parent, origin=str(DEFAULT_PARAMS))
    paths = params.paths.ingest
    manifest, reports = ingest(params.ingest, paths.dataset, paths.cache)
    rejected = manifest[manifest["verdict"] != "accepted"]
    atomic.write_csv(paths.rejected, rejected)
    atomic.write_text(
        paths.summary, render_summary(manifest, reports, params.ingest, paths.rejected)
    )
    summary = summarise(reports)
    atomic.write_json(paths.metrics, summary)
    for role, counts in summary.items():
        print(
            f"ingest {role}: {counts['files']} files, {counts['accepted']} accepted in "
            f"{counts['classes']} classes, {counts['rejected']} rejected, "
            f"{counts['duplicates']} duplicates, {counts['skipped']} skipped; "
            f"{reports[role].folder.decoded} decoded, "
            f"{counts['files'] - reports[role].folder.decoded} verdicts reused from the cache",
            file=sys.stderr,
        )
    for row in rejected.itertuples():
        print(f"  rejected {row.role}/{row.path}: {row.verdict} ({row.reason})", file=sys.stderr)
    for role, report in reports.items():  # last, where a person reading the log looks first
        for warning in warnings_of(report):
            print(f"warning: ingest {role}: {warning}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
