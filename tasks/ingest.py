"""Stage ``ingest``: verify every image of every source; store the accepted ones by content.

Reads ``ingest.*`` and ``paths.ingest.*`` from params.yaml, runs :func:`graft.data.ingest.ingest`
and writes the reports beside the dataset (see that module for the layout).
"""

from __future__ import annotations

import sys

from graft import atomic
from graft.config.checks import check_sources
from graft.config.params import DEFAULT_PARAMS, load_params
from graft.data.decoding import set_pixel_limit
from graft.data.ingest import ingest, render_summary, summarise
from graft.errors import run_main


def main() -> None:
    """Verify the sources and write ``paths.ingest.*``; run from the project root.

    Raises ParamsError (bad params, a missing source folder) before any work, and IngestError
    when a source breaks its rejection budget; nothing is written then.
    """
    params = load_params(DEFAULT_PARAMS)
    check_sources(params, DEFAULT_PARAMS.parent, origin=str(DEFAULT_PARAMS))
    # Pillow's guard at the setting never refuses a file the setting allows, and the files it
    # would warn about are the ones the setting rejects: they get a verdict, not a warning.
    set_pixel_limit(params.ingest.max_pixels)
    paths = params.paths.ingest
    manifest, reports = ingest(params.ingest, paths.dataset, paths.cache)
    rejected = manifest[manifest["verdict"] != "accepted"]
    atomic.write_csv(paths.rejected, rejected)
    atomic.write_text(paths.summary, render_summary(manifest, reports))
    summary = summarise(reports)
    atomic.write_json(paths.metrics, summary)
    for role, counts in summary.items():
        print(
            f"ingest {role}: {counts['files']} files, {counts['accepted']} accepted in "
            f"{counts['classes']} classes, {counts['rejected']} rejected, "
            f"{counts['skipped']} skipped; {reports[role].decoded} decoded, "
            f"{counts['files'] - reports[role].decoded} verdicts reused from the cache",
            file=sys.stderr,
        )
    for row in rejected.itertuples():
        print(f"  rejected {row.role}/{row.path}: {row.verdict} ({row.reason})", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
