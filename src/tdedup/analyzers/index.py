"""An incremental tensor-hash index: every file's tensor digests in one SQLite database.

``tdedup analyze --index PATH`` looks each weight file up by its real path and
:class:`~.work_units.FileStamp` (size, mtime_ns, inode); a file whose stamp and tensor
ranges match an entry is not read again. Only the client process touches the database
(Dask workers never do), so it belongs on a local disk: SQLite's WAL mode, which lets
several analyses read while one writes, needs shared memory that network file systems
do not give.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``application_id`` =
:data:`APPLICATION_ID`)::

    files(id, path UNIQUE, size, mtime_ns, inode, tensors, tensor_bytes, recorded_ns)
    tensors(file_id, ord, offset, length, digest BLOB(32))  -- one row per tensor

A file is recorded in its own short transaction as soon as it is hashed, so a run that is
interrupted keeps what it finished, and concurrent runs wait on each other for at most
``busy_timeout`` per write rather than for a whole analysis.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError, OutputError
from .work_units import FileStamp

SCHEMA_VERSION = 1
APPLICATION_ID = 0x74646478  # "tddx"
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    tensors INTEGER NOT NULL,
    tensor_bytes INTEGER NOT NULL,
    recorded_ns INTEGER NOT NULL
);
CREATE TABLE tensors (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (file_id, ord)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class IndexStats:
    """What an index holds (``tdedup index PATH --stats``)."""

    path: str
    schema_version: int
    files: int
    tensors: int
    tensor_bytes: int
    distinct_tensors: int
    distinct_tensor_bytes: int
    stale_files: int  # recorded, but now missing or with another stamp
    database_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


class TensorIndex:
    """An open index. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError("no such index", path=self.path)
        try:
            if create:  # "created when missing", its folder too (~/.cache/tdedup/...)
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            raise OutputError(f"cannot open the index: {e}", path=self.path) from e
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._prepare()
        except sqlite3.DatabaseError as e:
            self._db.close()
            if "not a database" in str(e):
                raise InputError("not a tdedup index (not an SQLite database)",
                                 path=self.path) from e
            raise OutputError(f"cannot use the index: {e}", path=self.path) from e
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        db = self._db
        # WAL persists in the file: readers never block the writer nor each other.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; never corrupt
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("BEGIN IMMEDIATE")  # two analyses creating one index: one creates it
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and version == 0 and tables == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise InputError("not a tdedup index (an SQLite database of something else)",
                                 path=self.path)
            elif version > SCHEMA_VERSION:
                raise InputError(f"index schema {version} is newer than this tdedup's "
                                 f"({SCHEMA_VERSION})", path=self.path,
                                 hint="upgrade tdedup, or give another --index")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- reading --------------------------------------------------------------------

    def lookup(self, path: str, stamp: FileStamp,
               ranges: Sequence[tuple[int, int]]) -> list[str] | None:
        """The digests of ``path``'s tensors if recorded under this stamp and these
        ranges, else None (never seen, changed since, or read with another header)."""
        row = self._db.execute(
            "SELECT id, tensors FROM files WHERE path = ? AND size = ? AND mtime_ns = ? "
            "AND inode = ?", (path, stamp.size, stamp.mtime_ns, stamp.inode)).fetchone()
        if row is None or row[1] != len(ranges):
            return None
        rows = self._db.execute(
            "SELECT offset, length, digest FROM tensors WHERE file_id = ? ORDER BY ord",
            (row[0],)).fetchall()
        if [(o, n) for o, n, _ in rows] != [tuple(r) for r in ranges]:
            return None
        return [d.hex() for _, _, d in rows]

    def stats(self, *, check_files: bool = True) -> IndexStats:
        """Counts of what the index holds; ``check_files`` stats every recorded file."""
        db = self._db
        db.execute("BEGIN")  # one consistent snapshot for every count
        try:
            files, tensor_bytes_f = db.execute(
                "SELECT count(*), coalesce(sum(tensor_bytes), 0) FROM files").fetchone()
            tensors, = db.execute("SELECT count(*) FROM tensors").fetchone()
            distinct, distinct_bytes = db.execute(
                "SELECT count(*), coalesce(sum(length), 0) FROM "
                "(SELECT DISTINCT digest, length FROM tensors)").fetchone()
            stale = 0
            if check_files:
                for path, size, mtime_ns, inode in db.execute(
                        "SELECT path, size, mtime_ns, inode FROM files"):
                    try:
                        now = FileStamp.of(path)
                    except InputError:
                        stale += 1
                        continue
                    stale += now != FileStamp(size, mtime_ns, inode)
            version = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.execute("COMMIT")
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                   if p.exists())
        return IndexStats(str(self.path), version, files, tensors, tensor_bytes_f, distinct,
                          distinct_bytes, stale, size)

    # -- writing --------------------------------------------------------------------

    def record(self, path: str, stamp: FileStamp, ranges: Sequence[tuple[int, int]],
               digests: Sequence[str]) -> None:
        """File one hashed file under its stamp, replacing any older entry for the path."""
        if len(ranges) != len(digests):
            raise ValueError("one digest per range")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM files WHERE path = ?", (path,))
                cur = db.execute(
                    "INSERT INTO files (path, size, mtime_ns, inode, tensors, tensor_bytes, "
                    "recorded_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (path, stamp.size, stamp.mtime_ns, stamp.inode, len(ranges),
                     sum(n for _, n in ranges), time.time_ns()))
                file_id = cur.lastrowid
                db.executemany(
                    "INSERT INTO tensors (file_id, ord, offset, length, digest) "
                    "VALUES (?, ?, ?, ?, ?)",
                    ((file_id, i, o, n, bytes.fromhex(d))
                     for i, ((o, n), d) in enumerate(zip(ranges, digests))))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise OutputError(f"cannot write the index: {e}", path=self.path) from e

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TensorIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
