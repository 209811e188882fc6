"""One SQL database, SQLite or PostgreSQL, for the tables that sit next to the adapter index: the
training files' rows (``server.jobs.files``) and the fine-tune jobs (``server.jobs.jobdb``).

Those tables are written once, in SQLite's dialect with ``?`` placeholders; ``SqlDB`` runs them on
either backend:

* ``SqliteDB``: a file (the embedded default). Every call opens a short-lived autocommit
  connection; writers take ``BEGIN IMMEDIATE``, so processes sharing the file (replicas on one
  machine) serialise their writes.
* ``PostgresDB``: a libpq DSN (the same ``store_index_url`` as the adapter index), connections
  from a small per-process pool, one transaction per call. ``?`` becomes ``%s``; REAL and INTEGER
  columns become DOUBLE PRECISION and BIGINT. A lost connection is ``Unavailable`` (503,
  ``where="index"``), as for the adapter index (``pgpool.PgPool``, shared by both).

Rows come back as dicts. ``open_db(url, sqlite_path)`` picks the backend from the URL
(``None``/``"sqlite"`` or ``postgresql://...``); psycopg is imported only for PostgreSQL.
"""

from __future__ import annotations

import re
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .pgpool import PgPool

_POOL_SIZE = 4
_PG_TYPES = {"REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT"}


class Cursor:
    """What a transaction hands out: ``execute`` with ``?`` placeholders, rows as dicts."""

    def __init__(self, raw, postgres: bool):
        self._raw = raw
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self._postgres:
            sql = sql.replace("%", "%%").replace("?", "%s")
        self._raw.execute(sql, tuple(params))
        return self

    def fetchone(self) -> dict | None:
        row = self._raw.fetchone()
        return None if row is None else dict(row)

    def fetchall(self) -> list[dict]:
        return [dict(r) for r in self._raw.fetchall()]

    def scalar(self) -> Any:
        """The first column of the first row (None without a row)."""
        row = self._raw.fetchone()
        return None if row is None else (row[0] if not isinstance(row, dict) else next(iter(row.values())))

    @property
    def rowcount(self) -> int:
        return self._raw.rowcount


class SqliteDB:
    dialect = "sqlite"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Cursor]:
        """One transaction: ``BEGIN IMMEDIATE`` for writers (the file's write lock at once, so a
        read-then-update is atomic against other processes), a plain snapshot for readers."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Cursor(conn.cursor(), postgres=False)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def create(self, schema: str, lock_key: str) -> None:
        with self._connect() as conn:
            conn.executescript(schema)

    def columns(self, table: str) -> set[str]:
        with self._connect() as conn:
            return {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}

    def add_column(self, table: str, name: str, kind: str) -> None:
        with self._connect() as conn:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def lock_row(self, cur: Cursor, table: str, key_column: str, key: str) -> None:
        """Serialise writers of one row: ``BEGIN IMMEDIATE`` already holds the whole file."""

    def close(self) -> None:
        pass


class PostgresDB:
    dialect = "postgres"

    def __init__(self, dsn: str, connect_timeout_s: int = 10):
        from psycopg.rows import dict_row  # lazily: the embedded default never imports psycopg

        self._pool = PgPool(dsn, "the index", _POOL_SIZE, connect_timeout_s)
        self._dict_row = dict_row

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Cursor]:
        """One transaction on a pooled connection (``pgpool.PgPool``); readers see one snapshot."""
        with self._pool.transaction(row_factory=self._dict_row) as cur:
            if not write:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield Cursor(cur, postgres=True)

    def create(self, schema: str, lock_key: str) -> None:
        """Create the tables under a transaction-level advisory lock, so replicas that open at
        once do not race on ``CREATE TABLE``."""
        ddl = re.sub(r"\b(REAL|INTEGER)\b", lambda m: _PG_TYPES[m.group(1)], schema)
        with self.transaction(write=True) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(lock_key.encode()),))
            for statement in filter(str.strip, ddl.split(";")):
                cur.execute(statement)

    def columns(self, table: str) -> set[str]:
        with self.transaction() as cur:
            cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))
            return {r["column_name"] for r in cur.fetchall()}

    def add_column(self, table: str, name: str, kind: str) -> None:
        kind = re.sub(r"\b(REAL|INTEGER)\b", lambda m: _PG_TYPES[m.group(1)], kind)
        with self.transaction(write=True) as cur:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")

    def lock_row(self, cur: Cursor, table: str, key_column: str, key: str) -> None:
        """Serialise writers of one row (``SELECT ... FOR UPDATE``) until the transaction ends."""
        cur.execute(f"SELECT 1 FROM {table} WHERE {key_column} = ? FOR UPDATE", (key,))

    def close(self) -> None:
        self._pool.close()


SqlDB = SqliteDB | PostgresDB


def open_db(url: str | None, sqlite_path: Path | str) -> SqlDB:
    """``None``/``"sqlite"``: the SQLite file ``sqlite_path``; ``postgresql://...``: that database."""
    if url in (None, "", "sqlite"):
        return SqliteDB(sqlite_path)
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("the index URL must be 'sqlite' or 'postgresql://...'")
    return PostgresDB(url)
