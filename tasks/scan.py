"""Stage ``scan``: fingerprint every source folder, so ``ingest`` re-runs exactly when they change.

Reads ``ingest.sources`` and ``paths`` from params.yaml and writes ``paths.scan.sources``: per
role, the source's class folders, file count, bytes and a content digest
(graft.data.fingerprint). DVC runs this stage every time (``always_changed``); it takes about
a second per 100,000 unchanged files, and ``ingest`` runs only when the file it writes changes.
"""

from __future__ import annotations

import sys

from graft import atomic
from graft.config.params import DEFAULT_PARAMS, load_params
from graft.data.fingerprint import fingerprint_sources
from graft.errors import run_main


def main() -> None:
    """Fingerprint the sources into ``paths.scan.sources``; run from the project root.

    Raises ParamsError (bad params, a missing source folder) before any work.
    """
    params = load_params(DEFAULT_PARAMS)
    fingerprints = fingerprint_sources(params.ingest.sources, params.paths.ingest.cache)
    for role, found in fingerprints.items():
        print(
            f"scan {role}: {found['files']} files in {len(found['classes'])} class folders "
            f"of {found['uri']}",
            file=sys.stderr,
        )
    atomic.write_json(params.paths.scan.sources, fingerprints)


if __name__ == "__main__":
    run_main(main)
