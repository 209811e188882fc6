"""The SQLite index of the store (the embedded default ``Index``, see ``backends.py``): one row per
adapter (its current version), a per-id version counter that survives deletes, so
``(adapter_id, version)`` never names two different uploads, and a tombstone per deleted version
(the garbage collector removes its blobs).

One connection per call (threads never share one), WAL journal, ``synchronous=FULL`` so that a
returned commit survives a power loss. Writes run in ``BEGIN IMMEDIATE`` transactions.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

READY = "ready"
QUARANTINED = "quarantined"

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id       TEXT PRIMARY KEY,
    version          INTEGER NOT NULL CHECK (version >= 1),
    family           TEXT NOT NULL,
    config           TEXT NOT NULL,
    trainable_params INTEGER NOT NULL,
    nbytes           INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    config_sha256    TEXT NOT NULL,
    base_model       TEXT NOT NULL,
    created_at       REAL NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('ready', 'quarantined')),
    error            TEXT
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id   TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    adapter_id TEXT NOT NULL,
    version    INTEGER NOT NULL,
    deleted_at REAL NOT NULL,
    PRIMARY KEY (adapter_id, version)
);
"""
_COLUMNS = (
    "adapter_id, version, family, config, trainable_params, nbytes, sha256, config_sha256, "
    "base_model, created_at, status, error"
)


@dataclass(frozen=True)
class AdapterRecord:
    """What the store knows about the current version of one adapter."""

    adapter_id: str
    version: int
    family: str
    config: dict
    trainable_params: int
    nbytes: int  # size of adapter_model.safetensors in bytes
    sha256: str  # of adapter_model.safetensors
    created_at: float  # epoch seconds of the upload of this version
    status: str  # "ready" | "quarantined"
    error: str | None  # why it is quarantined


@dataclass(frozen=True)
class Row:
    """A full index row: the public record plus what only the store needs."""

    record: AdapterRecord
    config_sha256: str
    base_model: str

    @property
    def adapter_id(self) -> str:
        return self.record.adapter_id

    @property
    def version(self) -> int:
        return self.record.version


def _row(values: tuple) -> Row:
    (aid, version, family, config, params, nbytes, sha, config_sha, base, created, status, error) = values
    try:
        cfg = json.loads(config)
        if not isinstance(cfg, dict):
            raise ValueError
    except (ValueError, TypeError):
        cfg, status, error = {}, QUARANTINED, error or "index entry unreadable"
    rec = AdapterRecord(aid, version, family, cfg, params, nbytes, sha, created, status, error)
    return Row(rec, config_sha, base)


_IOERR_SHORT_READ = getattr(sqlite3, "SQLITE_IOERR_SHORT_READ", 522)


class IndexDamaged(sqlite3.DatabaseError):
    pass


def is_damage(exc: BaseException) -> bool:
    """The index file is corrupt or not a database (as opposed to busy, read-only, ...)."""
    if isinstance(exc, IndexDamaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.DatabaseError) or code is None:
        return False
    # A truncated file reads short (SQLITE_IOERR_SHORT_READ); other I/O errors are not damage.
    return (code & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or code == _IOERR_SHORT_READ


def is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL


class SqliteIndex:
    def __init__(self, path: Path):
        self.path = path
        # Held open (never queried) so that closing a per-call connection is not the last close,
        # which would checkpoint and delete the WAL every time (~20 ms of fsyncs per call).
        self._keeper: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def open(self) -> None:
        """Create the schema and check the file; raises sqlite3.DatabaseError if it is damaged."""
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            result = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if result != ["ok"]:
                raise IndexDamaged("index failed quick_check")
            conn.execute(f"SELECT {_COLUMNS} FROM adapters").fetchall()  # every row decodes
        self._keeper = sqlite3.connect(self.path, check_same_thread=False)
        self._keeper.execute("SELECT COUNT(*) FROM versions").fetchall()  # maps the WAL index

    # ---- reads -------------------------------------------------------------------------------
    def get(self, adapter_id: str) -> Row | None:
        with self._connect() as conn:
            r = conn.execute(
                f"SELECT {_COLUMNS} FROM adapters WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()
        return None if r is None else _row(r)

    def page(self, offset: int, limit: int) -> tuple[list[Row], int]:
        with self._connect() as conn:
            conn.execute("BEGIN")  # one snapshot for the page and the count
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            (total,) = conn.execute("SELECT COUNT(*) FROM adapters").fetchone()
            conn.execute("COMMIT")
        return [_row(r) for r in rows], total

    def all_rows(self) -> list[Row]:
        with self._connect() as conn:
            return [_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id")]

    def total_bytes(self) -> int:
        with self._connect() as conn:
            (total,) = conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM adapters").fetchone()
        return int(total)

    # ---- writes ------------------------------------------------------------------------------
    def allocate_version(self, adapter_id: str) -> int:
        """Reserve the next version number of ``adapter_id`` (never reused, even after a delete)."""
        with self._write() as conn:
            r = conn.execute(
                "SELECT last_version FROM versions WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()
            c = conn.execute("SELECT version FROM adapters WHERE adapter_id = ?", (adapter_id,)).fetchone()
            version = max(r[0] if r else 0, c[0] if c else 0) + 1
            conn.execute(
                "INSERT INTO versions (adapter_id, last_version) VALUES (?, ?) "
                "ON CONFLICT(adapter_id) DO UPDATE SET last_version = excluded.last_version",
                (adapter_id, version),
            )
        return version

    def commit(self, row: Row) -> int | None:
        """Make ``row`` the current version; return the version it replaced (None if new).

        Returns -1 (and changes nothing) if the index already holds this or a newer version.
        """
        rec = row.record
        with self._write() as conn:
            old = conn.execute(
                "SELECT version FROM adapters WHERE adapter_id = ?", (rec.adapter_id,)
            ).fetchone()
            if old is not None and old[0] >= rec.version:
                return -1
            conn.execute(
                f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.adapter_id,
                    rec.version,
                    rec.family,
                    json.dumps(rec.config, sort_keys=True, allow_nan=False),
                    rec.trainable_params,
                    rec.nbytes,
                    rec.sha256,
                    row.config_sha256,
                    row.base_model,
                    rec.created_at,
                    rec.status,
                    rec.error,
                ),
            )
            conn.execute(
                "INSERT INTO versions (adapter_id, last_version) VALUES (?, ?) ON CONFLICT(adapter_id) "
                "DO UPDATE SET last_version = MAX(last_version, excluded.last_version)",
                (rec.adapter_id, rec.version),
            )
        return None if old is None else old[0]

    def delete(self, adapter_id: str) -> Row | None:
        """Remove the row and leave a tombstone for its version (one transaction)."""
        with self._write() as conn:
            r = conn.execute(
                f"SELECT {_COLUMNS} FROM adapters WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()
            if r is not None:
                conn.execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,))
                conn.execute(
                    "INSERT OR IGNORE INTO tombstones (adapter_id, version, deleted_at) VALUES (?, ?, ?)",
                    (adapter_id, r[1], time.time()),
                )
        return None if r is None else _row(r)

    def tombstones(self) -> dict[str, int]:
        with self._connect() as conn:
            rows = conn.execute("SELECT adapter_id, MAX(version) FROM tombstones GROUP BY adapter_id")
            return {aid: int(v) for aid, v in rows}

    def is_full(self, exc: BaseException) -> bool:
        return is_full(exc)

    def quarantine(self, adapter_id: str, version: int, sha256: str, reason: str) -> bool:
        """Quarantine exactly this stored version; False if the row changed meanwhile."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE adapters SET status = ?, error = ? "
                "WHERE adapter_id = ? AND version = ? AND sha256 = ?",
                (QUARANTINED, reason, adapter_id, version, sha256),
            )
            return cur.rowcount == 1


Index = SqliteIndex  # the name older callers import


def quarantined(row: Row, reason: str) -> Row:
    return replace(row, record=replace(row.record, status=QUARANTINED, error=reason))
