"""The PostgreSQL index (psycopg 3): the same rows, counters and tombstones as ``index.py``, shared
by every replica.

Each call borrows a connection from a small pool (a broken one is dropped, not reused) and runs
in one transaction. Writes of one id serialise on its ``versions`` row (``INSERT ... ON CONFLICT
DO UPDATE`` locks it until commit), so ``allocate_version`` hands out each number once and
``commit`` compares and replaces the current version atomically, across processes and machines.
The schema is created under a transaction-level advisory lock, so replicas opening at once do not
race on ``CREATE TABLE``. psycopg is imported only when this backend is chosen.
"""

from __future__ import annotations

import json
import time

from .index import _COLUMNS, QUARANTINED, Row, _row
from .pgpool import PgPool

_SCHEMA_LOCK = 0x46616365  # "Face": pg_advisory_xact_lock key for schema creation

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id       TEXT PRIMARY KEY,
    version          INTEGER NOT NULL CHECK (version >= 1),
    family           TEXT NOT NULL,
    config           TEXT NOT NULL,
    trainable_params BIGINT NOT NULL,
    nbytes           BIGINT NOT NULL,
    sha256           TEXT NOT NULL,
    config_sha256    TEXT NOT NULL,
    base_model       TEXT NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
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
    deleted_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (adapter_id, version)
);
"""

_POOL_SIZE = 8


class PostgresIndex:
    def __init__(self, dsn: str, connect_timeout_s: int = 10):
        self._pool = PgPool(dsn, "the adapter index", _POOL_SIZE, connect_timeout_s)
        self._psycopg = self._pool.psycopg

    def open(self) -> None:
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cur.execute(SCHEMA)
            cur.execute(f"SELECT {_COLUMNS} FROM adapters LIMIT 1")

    def close(self) -> None:
        self._pool.close()

    def _transaction(self):
        """One transaction on a pooled connection (``pgpool.PgPool``)."""
        return self._pool.transaction()

    # ---- reads -------------------------------------------------------------------------------
    def get(self, adapter_id: str) -> Row | None:
        with self._transaction() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM adapters WHERE adapter_id = %s", (adapter_id,))
            r = cur.fetchone()
        return None if r is None else _row(r)

    def page(self, offset: int, limit: int) -> tuple[list[Row], int]:
        with self._transaction() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot
            cur.execute(
                f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id LIMIT %s OFFSET %s", (limit, offset)
            )
            rows = cur.fetchall()
            cur.execute("SELECT COUNT(*) FROM adapters")
            (total,) = cur.fetchone()
        return [_row(r) for r in rows], int(total)

    def all_rows(self) -> list[Row]:
        with self._transaction() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id")
            return [_row(r) for r in cur.fetchall()]

    def total_bytes(self) -> int:
        with self._transaction() as cur:
            cur.execute("SELECT COALESCE(SUM(nbytes), 0) FROM adapters")
            (total,) = cur.fetchone()
        return int(total)

    def tombstones(self) -> dict[str, int]:
        with self._transaction() as cur:
            cur.execute("SELECT adapter_id, MAX(version) FROM tombstones GROUP BY adapter_id")
            return {aid: int(v) for aid, v in cur.fetchall()}

    # ---- writes ------------------------------------------------------------------------------
    def allocate_version(self, adapter_id: str) -> int:
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO versions AS v (adapter_id, last_version) VALUES (%(id)s, "
                "1 + COALESCE((SELECT version FROM adapters WHERE adapter_id = %(id)s), 0)) "
                "ON CONFLICT (adapter_id) DO UPDATE SET last_version = 1 + GREATEST(v.last_version, "
                "COALESCE((SELECT version FROM adapters WHERE adapter_id = %(id)s), 0)) "
                "RETURNING last_version",
                {"id": adapter_id},
            )
            (version,) = cur.fetchone()
        return int(version)

    def _lock_id(self, cur, adapter_id: str, version: int) -> None:
        """Take the id's ``versions`` row lock (creating the row if needed) for this transaction."""
        cur.execute(
            "INSERT INTO versions AS v (adapter_id, last_version) VALUES (%s, %s) ON CONFLICT (adapter_id) "
            "DO UPDATE SET last_version = GREATEST(v.last_version, excluded.last_version)",
            (adapter_id, version),
        )

    def commit(self, row: Row) -> int | None:
        rec = row.record
        with self._transaction() as cur:
            self._lock_id(cur, rec.adapter_id, rec.version)
            cur.execute("SELECT version FROM adapters WHERE adapter_id = %s", (rec.adapter_id,))
            old = cur.fetchone()
            if old is not None and old[0] >= rec.version:
                return -1
            values = (
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
            )
            updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])
            cur.execute(
                f"INSERT INTO adapters ({_COLUMNS}) VALUES ({', '.join(['%s'] * 12)}) "
                f"ON CONFLICT (adapter_id) DO UPDATE SET {updates}",
                values,
            )
        return None if old is None else int(old[0])

    def delete(self, adapter_id: str) -> Row | None:
        with self._transaction() as cur:
            self._lock_id(cur, adapter_id, 0)
            cur.execute(f"DELETE FROM adapters WHERE adapter_id = %s RETURNING {_COLUMNS}", (adapter_id,))
            r = cur.fetchone()
            if r is not None:
                cur.execute(
                    "INSERT INTO tombstones (adapter_id, version, deleted_at) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (adapter_id, r[1], time.time()),
                )
        return None if r is None else _row(r)

    def quarantine(self, adapter_id: str, version: int, sha256: str, reason: str) -> bool:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE adapters SET status = %s, error = %s "
                "WHERE adapter_id = %s AND version = %s AND sha256 = %s",
                (QUARANTINED, reason, adapter_id, version, sha256),
            )
            return cur.rowcount == 1

    def is_full(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.DiskFull)
