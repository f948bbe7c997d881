"""The layout of the ingested dataset folder (``paths.ingest.dataset``).

``manifest.csv`` lists every file ingest saw; the image store beside it (graft.data.store:
``index.csv`` and ``shards/``) holds each accepted image's exact bytes once, by content.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from graft.data import schemas

MANIFEST_NAME = "manifest.csv"


def manifest_path(dataset: Path) -> Path:
    """Where the manifest of the ingested ``dataset`` folder lives."""
    return dataset / MANIFEST_NAME


def read_manifest(dataset: Path) -> pd.DataFrame:
    """The manifest of ``dataset``, one row per file ingest saw, checked against its schema.

    Raises TableError when it does not match the schema, and OSError when it cannot be read.
    """
    return schemas.read_table(manifest_path(dataset), schemas.MANIFEST)
