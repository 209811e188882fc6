"""The fine-tune jobs' SQLite file: one row per job and an append-only list of events per job.

``JobDB`` knows rows and events only; what the statuses mean and how jobs run is
``server.jobs.runner``. Every call opens a short-lived autocommit connection (writers take
``BEGIN IMMEDIATE``), so the API threads, the training thread and a metrics scrape can use it at
the same time.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
# Columns added after the first release: (name, SQL type) added to an older jobs table at open.
_ADDED_COLUMNS = (
    ("epoch", "INTEGER"),
    ("val_loss", "REAL"),
    ("tokens_per_s", "REAL"),
    ("eta_s", "REAL"),
    ("interruptions", "INTEGER NOT NULL DEFAULT 0"),
    ("resumed_from", "INTEGER"),
    ("idempotency_key", "TEXT"),
    ("request_hash", "TEXT"),
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    adapter_id TEXT NOT NULL,
    method TEXT NOT NULL,
    config TEXT NOT NULL,
    target_modules TEXT,
    hyperparameters TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    loss REAL,
    n_train INTEGER NOT NULL,
    n_val INTEGER NOT NULL,
    error TEXT,
    result TEXT,
    epoch INTEGER,
    val_loss REAL,
    tokens_per_s REAL,
    eta_s REAL,
    interruptions INTEGER NOT NULL DEFAULT 0,
    resumed_from INTEGER,
    idempotency_key TEXT,
    request_hash TEXT
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


class JobNotFound(KeyError):
    pass


def _row_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d.pop("seq", None)
    d.pop("request_hash", None)
    for key in ("config", "target_modules", "hyperparameters", "result"):
        if d.get(key) is not None:
            d[key] = json.loads(d[key])
    return d


class JobDB:
    def __init__(self, path: Path):
        self._db_path = Path(path)
        self._write_lock = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection, closed after use (writers BEGIN IMMEDIATE themselves)."""
        db = sqlite3.connect(self._db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def event(self, job_id: str, kind: str, data: dict | None = None) -> None:
        with self._write_lock, self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,))
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (job_id, seq.fetchone()[0], time.time(), kind, json.dumps(data or {})),
            )
            db.execute("COMMIT")

    def update(self, job_id: str, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write_lock, self._db() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def insert(self, job_id: str, **fields) -> None:
        """A new job row (status queued); ``seq`` orders jobs by submission."""
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._write_lock, self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                f"INSERT INTO jobs (id, seq, status, created_at, {cols}) VALUES (?, ?, ?, ?, {marks})",
                (job_id, seq, QUEUED, time.time(), *fields.values()),
            )
            db.execute("COMMIT")

    def find_by_key(self, idempotency_key: str) -> dict | None:
        """The job submitted with this Idempotency-Key (with its ``request_hash``), if any."""
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return None if row is None else {**_row_dict(row), "request_hash": row["request_hash"]}

    def adapter_ids(self, *statuses: str) -> set[str]:
        """The ``adapter_id`` of every job in one of ``statuses``."""
        marks = ", ".join("?" for _ in statuses)
        with self._db() as db:
            rows = db.execute(f"SELECT DISTINCT adapter_id FROM jobs WHERE status IN ({marks})", statuses)
            return {r[0] for r in rows}

    def find_active(self, adapter_id: str, *statuses: str) -> dict | None:
        """The oldest job in one of ``statuses`` that trains ``adapter_id``, if any."""
        marks = ", ".join("?" for _ in statuses)
        query = f"SELECT * FROM jobs WHERE adapter_id = ? AND status IN ({marks}) ORDER BY seq LIMIT 1"
        with self._db() as db:
            row = db.execute(query, (adapter_id, *statuses)).fetchone()
        return None if row is None else _row_dict(row)

    def count(self, status: str) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def transition(self, job_id: str, old: str, new: str, **fields) -> bool:
        """Set status ``new`` (and ``fields``) only if the job is in status ``old``; True if it was."""
        cols = ", ".join(f"{k} = ?" for k in ("status", *fields))
        with self._write_lock, self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status = ?",
                (new, *fields.values(), job_id, old),
            )
            db.execute("COMMIT")
        return bool(cur.rowcount)

    def ids(self, status: str, limit: int = -1) -> list[str]:
        """Ids of the jobs in ``status``, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT ?", (status, limit))
            return [r[0] for r in rows]

    def get(self, job_id: str) -> dict:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _row_dict(row)

    def list(self, offset: int = 0, limit: int = 100) -> tuple[list[dict], int]:
        with self._db() as db:
            total = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset))
            return [_row_dict(r) for r in rows], total

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        self.get(job_id)
        with self._db() as db:
            rows = db.execute(
                "SELECT seq, time, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit),
            )
            return [{"seq": r[0], "time": r[1], "type": r[2], "data": json.loads(r[3])} for r in rows]

    def loss_curve(self, job_id: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """``(train, validation)`` as ``(step, loss)`` points, from the job's step and eval events."""
        self.get(job_id)
        train: list[tuple[int, float]] = []
        val: list[tuple[int, float]] = []
        with self._db() as db:
            rows = db.execute(
                "SELECT type, data FROM events WHERE job_id = ? AND type IN ('step', 'eval') ORDER BY seq",
                (job_id,),
            ).fetchall()
        for kind, data in rows:
            info = json.loads(data)
            if isinstance(info.get("step"), int) and isinstance(info.get("loss"), int | float):
                (train if kind == "step" else val).append((info["step"], float(info["loss"])))
        return train, val

    def stats(self) -> dict:
        """For metrics: jobs per status, training steps done (all jobs), and the latest train loss
        of the newest running job (else of the job that finished last; None if none has one)."""
        with self._db() as db:
            counts = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
            steps = db.execute("SELECT COALESCE(SUM(step), 0) FROM jobs").fetchone()[0]
            row = db.execute(
                "SELECT loss FROM jobs WHERE status = ? AND loss IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (RUNNING,),
            ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT loss FROM jobs WHERE finished_at IS NOT NULL AND loss IS NOT NULL"
                    " ORDER BY finished_at DESC LIMIT 1"
                ).fetchone()
        return {
            "jobs": {s: counts.get(s, 0) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)},
            "steps": int(steps),
            "last_loss": None if row is None else row[0],
        }
