"""Pooled psycopg connections and the one transaction shape every PostgreSQL table here uses.

Each call borrows a connection from a small per-process pool (or opens one) and runs in one
transaction. A lost connection (server down, network) is ``Unavailable`` (503, ``where="index"``),
never mistaken for damage; a full disk stays ``DiskFull``. A connection that failed or is left
inside a transaction is closed, not pooled. psycopg is imported only when a pool is built (the
embedded default never builds one).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Unavailable


class PgPool:
    def __init__(self, dsn: str, what: str, size: int, connect_timeout_s: int = 10):
        """``what`` names the tables in errors ("the adapter index"); ``size``: connections kept."""
        import psycopg

        self.psycopg = psycopg
        self.dsn = dsn
        self.what = what
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self._idle: queue.LifoQueue = queue.LifoQueue()

    @contextmanager
    def transaction(self, row_factory=None) -> Iterator:
        """A cursor inside one transaction (``row_factory``: psycopg's, None for tuples)."""
        pg = self.psycopg
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = pg.connect(self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s)
        except pg.OperationalError as e:
            raise Unavailable("index", f"{self.what} (PostgreSQL) is unreachable; retry") from e
        ok = False
        try:
            with conn.transaction(), conn.cursor(row_factory=row_factory) as cur:
                yield cur
            ok = True
        except pg.OperationalError as e:
            if isinstance(e, pg.errors.DiskFull):
                raise
            raise Unavailable("index", f"{self.what} (PostgreSQL) failed; retry") from e
        finally:
            idle = conn.info.transaction_status == pg.pq.TransactionStatus.IDLE
            if ok and idle and not conn.closed and self._idle.qsize() < self.size:
                self._idle.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
