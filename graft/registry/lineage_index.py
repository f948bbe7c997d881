"""An SQLite index of every published version's images, for ``graft lineage which-models``.

Reading a 25,000-row manifest and splits table per version from the DVC cache takes a while;
looking one sha256 up in an indexed table takes microseconds. The index (``paths.register.
lineage_index``, ignored by git and DVC) maps each version tag to the content keys of its
manifest and splits (the md5 ``dvc.lock`` records), and holds each distinct table once. Only
tags it has not seen, or that were re-created, are read again; tables shared between versions
are read once. It is derived data: deleting it is always safe.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.registry.package_layout import card_file
from graft.registry.revisions import RevisionError, lock_at, output_file, output_hash, params_at
from graft.registry.versions import Version, list_versions

SCHEMA_VERSION = 2
# Versions share almost all rows, so each distinct row is stored once (``*_rows``) and each
# table is a list of row ids (``*_members``): ten versions of 25,000 images cost little more
# than one. Missing values are stored as '' so that UNIQUE sees equal rows as equal.
_MANIFEST_COLUMNS = ("role", "label", "path", "sha256", "verdict", "reason")
_SPLIT_COLUMNS = ("role", "sha256", "label", "split", "path")
_TABLES = {"manifest": _MANIFEST_COLUMNS, "split": _SPLIT_COLUMNS}
_SCHEMA = "\n".join(
    [
        "CREATE TABLE versions(tag TEXT PRIMARY KEY, tag_object TEXT, name TEXT, version TEXT,"
        " commit_sha TEXT, created INTEGER, manifest_key TEXT, splits_key TEXT,"
        " weights_sha256 TEXT, error TEXT);",
        "CREATE TABLE tables(id INTEGER PRIMARY KEY, key TEXT UNIQUE);",
    ]
    + [
        f"CREATE TABLE {kind}_rows(id INTEGER PRIMARY KEY, {', '.join(columns)},"
        f" UNIQUE({', '.join(columns)}));"
        f"CREATE INDEX {kind}_by_sha ON {kind}_rows(sha256);"
        f"CREATE TABLE {kind}_members(table_id INTEGER, row_id INTEGER,"
        f" PRIMARY KEY(table_id, row_id)) WITHOUT ROWID;"
        f"CREATE INDEX {kind}_by_row ON {kind}_members(row_id);"
        for kind, columns in _TABLES.items()
    ]
)


@dataclass(frozen=True)
class TableKeys:
    """Content keys of one revision's manifest and splits tables (md5 from dvc.lock + path)."""

    manifest: str
    splits: str


@contextmanager
def open_index(path: Path) -> Iterator[sqlite3.Connection]:
    """Open the SQLite index at ``path`` for the ``with`` block, creating it (and its folder),
    or re-creating it when its schema is outdated; yields the connection and closes it on
    exit. Raises OSError and sqlite3.Error when the file cannot be created or opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path)
    try:
        if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            connection.close()
            path.unlink()
            connection = sqlite3.connect(path)
            with connection:
                connection.executescript(_SCHEMA)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        yield connection
    finally:
        connection.close()


def _key(lock: dict[str, Any], path: str) -> str:
    _, md5, relative = output_hash(lock, path)
    return f"{md5}:{relative}"


def _rows(data: bytes, columns: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        yield tuple(row.get(column) or "" for column in columns)


def _load(connection: sqlite3.Connection, kind: str, key: str, data: bytes) -> None:
    """Add one table: new distinct rows, then its membership list, in one transaction."""
    columns = _TABLES[kind]
    names, marks = ", ".join(columns), ", ".join("?" * len(columns))
    matches = " AND ".join(f"r.{c} = s.{c}" for c in columns)
    with connection:  # a table is in the index whole or not at all
        connection.execute(f"CREATE TEMP TABLE staging({names})")
        connection.executemany(f"INSERT INTO staging VALUES ({marks})", _rows(data, columns))
        connection.execute(f"INSERT OR IGNORE INTO {kind}_rows({names}) SELECT * FROM staging")
        table_id = connection.execute("INSERT INTO tables(key) VALUES (?)", (key,)).lastrowid
        connection.execute(
            f"INSERT OR IGNORE INTO {kind}_members SELECT ?, r.id FROM staging s "
            f"JOIN {kind}_rows r ON {matches}",
            (table_id,),
        )
        connection.execute("DROP TABLE staging")


def table_keys(connection: sqlite3.Connection, root: Path, commit: str) -> TableKeys:
    """The keys of the manifest and splits tables at ``commit`` of the repository ``root``,
    reading each into the index first if it is not there yet. Raises RevisionError when the
    commit's dvc.lock, params.yaml or tables cannot be read, KeyError when its params lack a
    path."""
    from graft.data.layout import MANIFEST_NAME  # imports pandas: kept off the warm path

    lock, paths = lock_at(root, commit), params_at(root, commit)["paths"]
    manifest_file = f"{paths['ingest']['dataset']}/{MANIFEST_NAME}"
    splits_file = str(paths["split"]["splits"])
    keys = TableKeys(_key(lock, manifest_file), _key(lock, splits_file))
    for kind, key, file in (
        ("manifest", keys.manifest, manifest_file),
        ("split", keys.splits, splits_file),
    ):
        if not connection.execute("SELECT 1 FROM tables WHERE key = ?", (key,)).fetchone():
            _load(connection, kind, key, output_file(root, commit, file))
    return keys


def _weights_sha256(root: Path, commit: str) -> str | None:
    package = params_at(root, commit)["paths"]["register"]["package"]
    card = json.loads(output_file(root, commit, card_file(package)))
    digest = card.get("inputs_sha256", {}).get("weights")
    return str(digest) if digest else None


def refresh(connection: sqlite3.Connection, root: Path) -> list[Version]:
    """Bring the index up to date with the version tags of the repository ``root``: drop
    deleted tags, read new and re-created ones (a version that cannot be read is recorded
    with its error, not raised). Returns every version, as :func:`list_versions` orders them.
    Raises RevisionError when git fails."""
    versions = list_versions(root)
    known = dict(connection.execute("SELECT tag, tag_object FROM versions").fetchall())
    current = {v.tag for v in versions}
    with connection:
        connection.executemany(
            "DELETE FROM versions WHERE tag = ?", [(t,) for t in known if t not in current]
        )
    for version in versions:
        if known.get(version.tag) == version.tag_object:
            continue
        keys: TableKeys | None = None
        weights = error = None
        try:
            keys = table_keys(connection, root, version.commit)
            weights = _weights_sha256(root, version.commit)
        except (RevisionError, KeyError, TypeError) as problem:
            error = f"{type(problem).__name__}: {problem}"  # not a graft version: say so
        with connection:
            connection.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    version.tag,
                    version.tag_object,
                    version.name,
                    version.version,
                    version.commit,
                    version.created,
                    keys.manifest if keys else None,
                    keys.splits if keys else None,
                    weights,
                    error,
                ),
            )
    return versions


def versions_with_weights(connection: sqlite3.Connection, sha256: str) -> list[str]:
    """Tags of the indexed versions whose model weights have the hex digest ``sha256``, oldest
    first; empty when none has. Raises nothing beyond sqlite3.Error."""
    rows = connection.execute(
        "SELECT tag FROM versions WHERE weights_sha256 = ? ORDER BY created", (sha256,)
    )
    return [tag for (tag,) in rows]


def _select(kind: str, where: str) -> str:
    """Rows of one kind with the key of each table holding them, filtered by ``where``."""
    columns = ", ".join(f"r.{c}" for c in _TABLES[kind])
    return (
        f"SELECT t.key, {columns} FROM {kind}_rows r JOIN {kind}_members m ON m.row_id = r.id "
        f"JOIN tables t ON t.id = m.table_id WHERE {where}"
    )


def _entry(kind: str, values: tuple[str, ...]) -> dict[str, str | None]:
    return {c: v or None for c, v in zip(_TABLES[kind], values, strict=True)}


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
