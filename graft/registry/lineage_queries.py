"""Questions asked of the lineage index: which versions used an image, and where; a version's
splits; the versions with given weights. The index is built by graft.registry.lineage_index."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from graft.registry.lineage_index import TABLE_COLUMNS, refresh


def versions_with_weights(connection: sqlite3.Connection, sha256: str) -> list[str]:
    """Tags of the indexed versions whose model weights have the hex digest ``sha256``, oldest
    first; empty when none has. Raises nothing beyond sqlite3.Error."""
    rows = connection.execute(
        "SELECT tag FROM versions WHERE weights_sha256 = ? ORDER BY created", (sha256,)
    )
    return [tag for (tag,) in rows]


def _select(kind: str, where: str) -> str:
    """Rows of one kind with the key of each table holding them, filtered by ``where``."""
    columns = ", ".join(f"r.{c}" for c in TABLE_COLUMNS[kind])
    return (
        f"SELECT t.key, {columns} FROM {kind}_rows r JOIN {kind}_members m ON m.row_id = r.id "
        f"JOIN tables t ON t.id = m.table_id WHERE {where}"
    )


def _entry(kind: str, values: tuple[str, ...]) -> dict[str, str | None]:
    return {c: v or None for c, v in zip(TABLE_COLUMNS[kind], values, strict=True)}


def split_table(connection: sqlite3.Connection, key: str) -> list[dict[str, str | None]]:
    """The rows of the indexed splits table ``key`` (see :func:`table_keys`): role, sha256,
    label, split and path of each image, empty values as None. Empty for an unknown key."""
    rows = connection.execute(_select("split", "t.key = ?"), (key,))
    return [_entry("split", row[1:]) for row in rows]


def which_models(connection: sqlite3.Connection, root: Path, sha256: str) -> list[dict[str, Any]]:
    """For each published version of the repository ``root``, oldest first: whether the image
    with hex digest ``sha256`` was used (its role and split), rejected (verdict and reason),
    absent, or whether the version is unreadable. Refreshes the index first (see
    :func:`refresh`). Returns JSON-ready dicts. Raises RevisionError when git fails."""
    versions = refresh(connection, root)
    info = {
        row[0]: row[1:]
        for row in connection.execute(
            "SELECT tag, manifest_key, splits_key, error FROM versions"
        ).fetchall()
    }
    manifest_hits: dict[str, list[dict[str, Any]]] = {}
    for key, *values in connection.execute(_select("manifest", "r.sha256 = ?"), (sha256,)):
        manifest_hits.setdefault(key, []).append(_entry("manifest", tuple(values)))
    split_hits: dict[tuple[str, str | None], str | None] = {}
    for key, *values in connection.execute(_select("split", "r.sha256 = ?"), (sha256,)):
        entry = _entry("split", tuple(values))
        split_hits[(key, entry["role"])] = entry["split"]
    report = []
    for version in versions:
        manifest_key, splits_key, error = info[version.tag]
        entries = []
        for entry in manifest_hits.get(manifest_key, []):
            split = split_hits.get((splits_key, entry["role"]))
            entries.append({**entry, "split": split if entry["verdict"] == "accepted" else None})
        if error:
            status = "unreadable"
        elif any(e["split"] for e in entries):
            status = "used"
        elif entries:
            status = "rejected"
        else:
            status = "absent"
        report.append(
            {
                "name": version.name,
                "version": version.version,
                "tag": version.tag,
                "commit": version.commit,
                "status": status,
                "entries": entries,
                **({"error": error} if error else {}),
            }
        )
    return report
