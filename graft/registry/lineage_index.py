"""An SQLite index of every published version's images, for ``graft lineage which-models``.

Reading a 25,000-row manifest and splits table per version from the DVC cache takes a while;
looking one sha256 up in an indexed table takes microseconds. The index (``paths.register.
lineage_index``, ignored by git and DVC) maps each version tag to the content keys of its
manifest and splits (the md5 ``dvc.lock`` records), and holds each distinct table once. Only
tags it has not seen, that were re-created or that could not be read last time are read again;
tables shared between versions are read once. Several processes may build it at once: every
write is one short transaction that adds a whole table or version, or nothing. It is derived
data: deleting it is always safe.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

from graft.errors import GraftError
from graft.registry.package_layout import card_file
from graft.registry.revisions import RevisionError, lock_at, output_file, output_hash, params_at
from graft.registry.versions import Version, list_versions

SCHEMA_VERSION = 2
# How long a process waits for another one's write transaction (SQLite's busy timeout). One
# transaction adds one table, so the longest wait is about one table's insert.
BUSY_TIMEOUT_S = 60.0
# Versions share almost all rows, so each distinct row is stored once (``*_rows``) and each
# table is a list of row ids (``*_members``): ten versions of 25,000 images cost little more
# than one. Missing values are stored as '' so that UNIQUE sees equal rows as equal.
_MANIFEST_COLUMNS = ("role", "label", "path", "sha256", "verdict", "reason")
_SPLIT_COLUMNS = ("role", "sha256", "label", "split", "path")
TABLE_COLUMNS = {"manifest": _MANIFEST_COLUMNS, "split": _SPLIT_COLUMNS}  # per kind of table
_SCHEMA = [
    "CREATE TABLE versions(tag TEXT PRIMARY KEY, tag_object TEXT, name TEXT, version TEXT,"
    " commit_sha TEXT, created INTEGER, manifest_key TEXT, splits_key TEXT,"
    " weights_sha256 TEXT, error TEXT)",
    "CREATE TABLE tables(id INTEGER PRIMARY KEY, key TEXT UNIQUE)",
] + [
    statement
    for kind, columns in TABLE_COLUMNS.items()
    for statement in (
        f"CREATE TABLE {kind}_rows(id INTEGER PRIMARY KEY, {', '.join(columns)},"
        f" UNIQUE({', '.join(columns)}))",
        f"CREATE INDEX {kind}_by_sha ON {kind}_rows(sha256)",
        f"CREATE TABLE {kind}_members(table_id INTEGER, row_id INTEGER,"
        f" PRIMARY KEY(table_id, row_id)) WITHOUT ROWID",
        f"CREATE INDEX {kind}_by_row ON {kind}_members(row_id)",
    )
]


class MalformedVersion(GraftError):
    """A version's params.yaml or model card lacks what graft writes there: not a graft
    version, or one from a release that laid its files out differently."""


@dataclass(frozen=True)
class TableKeys:
    """Content keys of one revision's manifest and splits tables (md5 from dvc.lock + path)."""

    manifest: str
    splits: str


@contextmanager
def _writing(connection: sqlite3.Connection) -> Iterator[None]:
    """A write transaction for the ``with`` block: committed when it ends, rolled back when it
    raises (and the error re-raised). Raises sqlite3.OperationalError ("database is locked")
    when another process holds the write lock for longer than the busy timeout."""
    # IMMEDIATE takes the write lock up front, waiting for another writer under the busy
    # timeout. A deferred transaction that reads and then writes can fail at once instead:
    # SQLite cannot wait there without risking a deadlock between the two.
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if connection.in_transaction:  # SQLite may already have rolled back (disk full)
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _ensure_schema(connection: sqlite3.Connection) -> None:
    """Create the index's tables in a new file, or drop and re-create them when another
    SCHEMA_VERSION made them; once, however many processes open the file at the same time.
    Raises sqlite3.Error when the file is not a database or cannot be written."""
    if connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    with _writing(connection):
        if connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # another process created it while this one waited for the lock
        old = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
        ).fetchall()
        for (name,) in old:
            connection.execute(f'DROP TABLE "{name}"')  # and its indexes
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextmanager
def open_index(path: Path) -> Iterator[sqlite3.Connection]:
    """Open the SQLite index at ``path`` for the ``with`` block, creating it (and its folder),
    or re-creating its tables when its schema is outdated; yields the connection and closes it
    on exit. Several processes may use one index at the same time. Raises OSError and
    sqlite3.Error when the file cannot be created or opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # No implicit transactions: every write here is an explicit BEGIN IMMEDIATE (_writing).
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        _ensure_schema(connection)
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
    """Add the table ``key`` of ``kind`` ("manifest" or "split") from its CSV bytes ``data``:
    its new distinct rows, then its membership list, in one transaction, so that it is in the
    index whole or not at all. Does nothing when the table is there already (another process
    may have added it since it was looked up). Raises sqlite3.Error."""
    columns = TABLE_COLUMNS[kind]
    names, marks = ", ".join(columns), ", ".join("?" * len(columns))
    matches = " AND ".join(f"r.{c} = s.{c}" for c in columns)
    rows = list(_rows(data, columns))  # parsed before taking the write lock, to keep it short
    with _writing(connection):
        added = connection.execute("INSERT OR IGNORE INTO tables(key) VALUES (?)", (key,))
        if added.rowcount == 0:
            return
        connection.execute(f"CREATE TEMP TABLE staging({names})")
        connection.executemany(f"INSERT INTO staging VALUES ({marks})", rows)
        connection.execute(f"INSERT OR IGNORE INTO {kind}_rows({names}) SELECT * FROM staging")
        connection.execute(
            f"INSERT OR IGNORE INTO {kind}_members SELECT ?, r.id FROM staging s "
            f"JOIN {kind}_rows r ON {matches}",
            (added.lastrowid,),
        )
        connection.execute("DROP TABLE staging")


def _setting(params: dict[str, Any], commit: str, *keys: str) -> str:
    """The path at ``keys`` (like "paths", "split", "splits") in ``params``, the parsed
    params.yaml of ``commit``. Raises MalformedVersion when it is missing or not a string."""
    try:
        value = reduce(operator.getitem, keys, params)
    except (KeyError, TypeError):  # from these lookups only: a key missing or not a mapping
        value = None
    if not isinstance(value, str):
        raise MalformedVersion(f"params.yaml at {commit[:12]} has no path {'.'.join(keys)}")
    return value


def table_keys(connection: sqlite3.Connection, root: Path, commit: str) -> TableKeys:
    """The keys of the manifest and splits tables at ``commit`` of the repository ``root``,
    reading each into the index first if it is not there yet. Raises RevisionError when the
    commit's dvc.lock, params.yaml or tables cannot be read, MalformedVersion when its params
    lack a path."""
    from graft.data.layout import MANIFEST_NAME  # imports pandas: kept off the warm path

    lock, params = lock_at(root, commit), params_at(root, commit)
    manifest_file = f"{_setting(params, commit, 'paths', 'ingest', 'dataset')}/{MANIFEST_NAME}"
    splits_file = _setting(params, commit, "paths", "split", "splits")
    keys = TableKeys(_key(lock, manifest_file), _key(lock, splits_file))
    for kind, key, file in (
        ("manifest", keys.manifest, manifest_file),
        ("split", keys.splits, splits_file),
    ):
        if not connection.execute("SELECT 1 FROM tables WHERE key = ?", (key,)).fetchone():
            _load(connection, kind, key, output_file(root, commit, file))
    return keys


def _weights_sha256(root: Path, commit: str) -> str | None:
    """The model's sha256 that the model card at ``commit`` records, None when it records
    none. Raises RevisionError when the card cannot be read, MalformedVersion when the params
    lack the package path or the card is not a JSON object."""
    package = _setting(params_at(root, commit), commit, "paths", "register", "package")
    try:
        card = json.loads(output_file(root, commit, card_file(package)))
    except ValueError as error:  # not JSON, or not text at all
        raise MalformedVersion(f"the model card at {commit[:12]} is not JSON: {error}") from None
    if not isinstance(card, dict):
        raise MalformedVersion(f"the model card at {commit[:12]} is not a JSON object")
    inputs = card.get("inputs_sha256")
    digest = inputs.get("weights") if isinstance(inputs, dict) else None
    return str(digest) if digest else None


def _is_indexed(connection: sqlite3.Connection, version: Version) -> bool:
    """Whether ``version``, as its tag is now, is in the index and was read without error."""
    found = connection.execute(
        "SELECT 1 FROM versions WHERE tag = ? AND tag_object = ? AND error IS NULL",
        (version.tag, version.tag_object),
    )
    return found.fetchone() is not None


def _index_version(connection: sqlite3.Connection, root: Path, version: Version) -> None:
    """Read ``version`` of the repository ``root`` into the index; a version that cannot be
    read is stored with its error instead. Raises sqlite3.Error, and any error other than
    RevisionError and MalformedVersion (which would be a bug)."""
    found: dict[str, str | None]
    error = None
    try:
        keys = table_keys(connection, root, version.commit)
        weights = _weights_sha256(root, version.commit)
        found = {"manifest": keys.manifest, "splits": keys.splits, "weights": weights}
    except (RevisionError, MalformedVersion) as problem:
        # Unreadable (its data neither in the cache nor on a reachable remote), or not a graft
        # version. Stored so that it is reported, but _is_indexed says no: read again next time.
        found = dict.fromkeys(("manifest", "splits", "weights"))
        error = f"{type(problem).__name__}: {problem}"
    with _writing(connection):
        connection.execute(
            "INSERT OR REPLACE INTO versions VALUES (:tag, :tag_object, :name, :version,"
            " :commit, :created, :manifest, :splits, :weights, :error)",
            {**asdict(version), **found, "error": error},
        )


def refresh(connection: sqlite3.Connection, root: Path) -> list[Version]:
    """Bring the index up to date with the version tags of the repository ``root``: drop
    deleted tags, read new and re-created ones, and read again those that could not be read
    last time (a version that still cannot be read is stored with its error, not raised).
    Other processes may refresh the same index at the same time. Returns every version, as
    :func:`list_versions` orders them. Raises RevisionError when git fails, sqlite3.Error."""
    versions = list_versions(root)
    current = {v.tag for v in versions}
    gone = [(t,) for (t,) in connection.execute("SELECT tag FROM versions") if t not in current]
    if gone:  # a warm call takes no write lock
        with _writing(connection):
            connection.executemany("DELETE FROM versions WHERE tag = ?", gone)
    for version in versions:
        # Asked per version, not once up front: another process may have indexed it meanwhile.
        if not _is_indexed(connection, version):
            _index_version(connection, root, version)
    return versions
