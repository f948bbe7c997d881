"""What ingest remembers between runs, so a re-run decodes only new or changed files.

Two tables in one SQLite file, plus a content-addressed object store:

- ``stats``: file path + size + mtime + inode -> sha256, so an unchanged file is not even
  read again (the same heuristic DVC and git use for their own state);
- ``checks``: sha256 + check settings -> verdict, reason, header facts and perceptual hash,
  so content that was judged once under the same settings is never decoded again, wherever
  it moves;
- ``objects/<sha256[:2]>/<sha256>``: the bytes of every accepted image, read-only, from which
  ingest packs the dataset's new shards without reading the sources again.

Everything here is keyed by content and settings, so the cache can only make a run faster,
never different; deleting it is always safe.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from graft.data.image_check import ImageCheck

SCHEMA = """
CREATE TABLE IF NOT EXISTS stats (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT
);
CREATE TABLE IF NOT EXISTS checks (
    sha256 TEXT, settings TEXT, verdict TEXT, reason TEXT,
    width INTEGER, height INTEGER, mode TEXT, format TEXT, phash TEXT,
    PRIMARY KEY (sha256, settings)
);
DROP TABLE IF EXISTS verdicts;
"""  # ``verdicts`` held the checks of graft before perceptual hashes; its keys have expired


class FileStat(NamedTuple):
    """What says a file is unchanged: size in bytes, mtime in nanoseconds and inode (a named
    tuple, so it compares with the stats table's rows as they come)."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, result: os.stat_result) -> FileStat:
        """The facts of an ``os.stat`` result."""
        return cls(result.st_size, result.st_mtime_ns, result.st_ino)


class VerifyCache:
    """The stats/verdicts database and the object store under one folder.

    Opening creates ``folder`` when needed (raising OSError or sqlite3.Error when it cannot);
    use it as a context manager, or call :meth:`close`. Lookups are for one thread; the object
    store (:func:`store_object`) may be written from many.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.objects = folder / "objects"
        self._db = sqlite3.connect(folder / "verdicts.sqlite")
        self._db.executescript(SCHEMA)
        # path -> (size, mtime_ns, inode, sha256): plain tuples, built once per run for
        # every file, so loading 250,000 rows costs a fetch, not 250,000 objects.
        self._hashes: dict[str, tuple[int, int, int, str]] | None = None
        self._verdicts: dict[str, dict[str, ImageCheck]] = {}
        self._stored: set[str] | None = None

    def close(self) -> None:
        """Close the database; recorded entries are already committed."""
        self._db.close()

    def __enter__(self) -> VerifyCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def object_path(self, sha256: str) -> Path:
        """Where the accepted bytes with this sha256 (hex) are stored, whether or not they are."""
        return object_path(self.objects, sha256)

    def known_hash(self, path: str, stat: FileStat) -> str | None:
        """The sha256 (hex) recorded for ``path`` if its size, mtime and inode are unchanged."""
        known = self.stat_hashes().get(path)
        if known is None or known[:3] != stat:
            return None
        return known[3]

    def stat_hashes(self) -> dict[str, tuple[int, int, int, str]]:
        """Every recorded path -> (size in bytes, mtime in ns, inode, sha256 hex), loaded in one
        query and kept until the next :meth:`remember`; for callers that look up every file of
        a folder in a tight loop (the scan stage)."""
        if self._hashes is None:  # one query for the whole table, not one per file
            rows = self._db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM stats")
            self._hashes = {
                path: (size, mtime, inode, sha) for path, size, mtime, inode, sha in rows
            }
        return self._hashes

    def known_verdict(self, sha256: str, settings: str) -> ImageCheck | None:
        """The verdict recorded for this content under these settings, if still usable.

        ``settings`` is a :meth:`graft.data.verify.CheckSettings.key`. None when there is none,
        or when it is ``accepted`` but the bytes are no longer in the store.
        """
        if settings not in self._verdicts:
            rows = self._db.execute(
                "SELECT sha256, verdict, reason, width, height, mode, format, phash FROM checks "
                "WHERE settings = ?",
                (settings,),
            )
            self._verdicts[settings] = {row[0]: ImageCheck(*row[1:]) for row in rows}
        check = self._verdicts[settings].get(sha256)
        # An accepted verdict is only reusable while its bytes are still in the store.
        if check and check.verdict == "accepted" and sha256 not in self._stored_objects():
            return None
        return check

    def _stored_objects(self) -> set[str]:
        # Listing 256 folders once beats one stat per file on every re-run.
        if self._stored is None:
            self._stored = set()
            if self.objects.is_dir():
                for folder in self.objects.iterdir():
                    self._stored.update(
                        name for name in os.listdir(folder) if not name.startswith(".")
                    )
        return self._stored

    def remember(
        self,
        settings: str,
        entries: Iterable[tuple[str, FileStat, str, ImageCheck]],
    ) -> None:
        """Record (path, stat, sha256, check) for files verified in this run, under ``settings``.

        Later entries for the same path, or the same content and settings, replace earlier ones.
        """
        rows = list(entries)
        self._hashes, self._verdicts, self._stored = None, {}, None  # reload on next lookup
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?)",
                [(p, s.size, s.mtime_ns, s.inode, sha) for p, s, sha, _ in rows],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(sha, settings, *_columns(c)) for _, _, sha, c in rows],
            )

    def remember_hashes(self, entries: Iterable[tuple[str, FileStat, str]]) -> None:
        """Record (path, stat, sha256) of files hashed without being checked (the scan stage),
        so that neither the next scan nor ingest reads them again while they are unchanged."""
        rows = [(p, s.size, s.mtime_ns, s.inode, sha) for p, s, sha in entries]
        if not rows:
            return
        self._hashes = None  # reload on next lookup
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?)", rows)


def _columns(check: ImageCheck) -> tuple[object, ...]:
    return (
        check.verdict, check.reason, check.width, check.height, check.mode, check.format,
        check.phash,
    )  # fmt: skip


def object_path(objects: Path, sha256: str) -> Path:
    """``objects/<sha256[:2]>/<sha256>``: where bytes with this sha256 (hex) belong."""
    return objects / sha256[:2] / sha256


def store_object(objects: Path, sha256: str, data: bytes) -> None:
    """Write ``data`` under its hash (``sha256``, hex), once, atomically and read-only.

    Safe from many threads and processes at once. Raises OSError when the store is not
    writable.
    """
    target = object_path(objects, sha256)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unique per thread as well as per process: two threads may store the same content.
    temporary = target.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
    try:
        os.write(handle, data)
    finally:
        os.close(handle)
    os.replace(temporary, target)
