"""The fine-tune jobs' table: one row per job and an append-only list of events per job.

``JobDB`` knows rows, events and the claim protocol only; what the statuses mean and how jobs run
is ``server.jobs.runner``. The tables live in SQLite (``<data_dir>/jobs/jobs.sqlite3``, the
embedded default) or in the adapter index's PostgreSQL (``adapters_store.sqldb``), so every
replica sharing the store sees every job.

**Claims and leases.** A queued job is taken by exactly one runner: ``claim`` moves it to
``running`` with one conditional ``UPDATE ... WHERE status = 'queued'`` inside a write
transaction (SQLite: ``BEGIN IMMEDIATE`` holds the file; PostgreSQL: the candidate row is
selected ``FOR UPDATE SKIP LOCKED``, so concurrent claimers take different jobs), and records the
runner's id and a lease (``lease_until``). The running runner renews the lease (``renew``) and
fences every later write on ``runner = <its id>``; a runner that finds it no longer holds the job
stops. ``stale_running`` lists running jobs whose lease expired (or whose runner is known dead);
``requeue_if`` takes one back only if its runner and lease are still the ones observed
(compare-and-set), so two replicas recovering at once recover it once, and a lease renewed
meanwhile is never taken.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from adapters_store.sqldb import SqlDB, open_db

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
    # the shared store (docs/scale-out.md, "Fine-tune jobs on a shared store")
    ("runner", "TEXT"),
    ("lease_until", "REAL"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
    ("train_sha256", "TEXT"),
    ("train_bytes", "INTEGER"),
    ("val_sha256", "TEXT"),
    ("val_bytes", "INTEGER"),
    ("state_key", "TEXT"),
    ("state_sha256", "TEXT"),
    ("state_bytes", "INTEGER"),
    ("state_step", "INTEGER"),
)
# Bookkeeping columns a job's public dict leaves out.
_PRIVATE = frozenset(
    ("seq", "request_hash", "lease_until", "cancel_requested", "train_sha256", "train_bytes")
    + ("val_sha256", "val_bytes", "state_key", "state_sha256", "state_bytes", "state_step")
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
    result TEXT
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


def public(row: dict) -> dict:
    d = {k: v for k, v in row.items() if k not in _PRIVATE}
    for key in ("config", "target_modules", "hyperparameters", "result"):
        if d.get(key) is not None:
            d[key] = json.loads(d[key])
    return d


class JobDB:
    def __init__(self, path: Path, index_url: str | None = None):
        """``path``: the SQLite file (the default); ``index_url``: a ``postgresql://`` DSN instead."""
        self.sql: SqlDB = open_db(index_url, path)
        self.sql.create(_SCHEMA, "facet-jobs")
        have = self.sql.columns("jobs")
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self.sql.add_column("jobs", name, kind)

    def close(self) -> None:
        self.sql.close()

    # ---- writes ------------------------------------------------------------------------------
    def event(self, job_id: str, kind: str, data: dict | None = None) -> None:
        with self.sql.transaction(write=True) as cur:
            self.sql.lock_row(cur, "jobs", "id", job_id)  # one writer of this job's sequence
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,))
            cur.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (job_id, seq.scalar(), time.time(), kind, json.dumps(data or {})),
            )

    def update(self, job_id: str, *, owner: str | None = None, **fields) -> bool:
        """Set ``fields``; with ``owner`` (a runner id), only while that runner holds the job (a
        fenced write). True if the row was updated."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        where, args = "id = ?", [job_id]
        if owner is not None:
            where += " AND status = ? AND runner = ?"
            args += [RUNNING, owner]
        with self.sql.transaction(write=True) as cur:
            cur.execute(f"UPDATE jobs SET {cols} WHERE {where}", (*fields.values(), *args))
            return cur.rowcount == 1

    def insert(self, job_id: str, **fields) -> str | None:
        """A new job row (status queued); ``seq`` orders jobs by submission. In the same
        transaction (one inserter at a time, on every replica) it refuses, returning why, a job
        whose ``idempotency_key`` was used already (``"key"``) or whose ``adapter_id`` a queued or
        running job trains (``"adapter_id"``); None when inserted."""
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.sql.transaction(write=True) as cur:
            if self.sql.dialect == "postgres":
                cur.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
            key = fields.get("idempotency_key")
            used = "SELECT 1 FROM jobs WHERE idempotency_key = ?"
            if key is not None and cur.execute(used, (key,)).fetchone():
                return "key"
            active = "SELECT 1 FROM jobs WHERE adapter_id = ? AND status IN (?, ?)"
            if cur.execute(active, (fields["adapter_id"], QUEUED, RUNNING)).fetchone():
                return "adapter_id"
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").scalar()
            cur.execute(
                f"INSERT INTO jobs (id, seq, status, created_at, {cols}) VALUES (?, ?, ?, ?, {marks})",
                (job_id, seq, QUEUED, time.time(), *fields.values()),
            )
        return None

    def transition(self, job_id: str, old: str, new: str, **fields) -> bool:
        """Set status ``new`` (and ``fields``) only if the job is in status ``old``; True if it was."""
        cols = ", ".join(f"{k} = ?" for k in ("status", *fields))
        with self.sql.transaction(write=True) as cur:
            cur.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status = ?", (new, *fields.values(), job_id, old)
            )
            return cur.rowcount == 1

    # ---- claims and leases -------------------------------------------------------------------
    def claim(self, runner: str, lease_s: float, job_id: str | None = None) -> str | None:
        """Take the oldest queued job (or ``job_id`` if it is queued) for ``runner``: running,
        leased for ``lease_s``. Returns its id, None when there is none to take."""
        now = time.time()
        only = " AND id = ?" if job_id is not None else ""
        skip = " FOR UPDATE SKIP LOCKED" if self.sql.dialect == "postgres" else ""
        with self.sql.transaction(write=True) as cur:
            cur.execute(
                f"SELECT id FROM jobs WHERE status = ?{only} ORDER BY seq LIMIT 1{skip}",
                (QUEUED, job_id) if job_id is not None else (QUEUED,),
            )
            found = cur.scalar()
            if found is None:
                return None
            cur.execute(
                "UPDATE jobs SET status = ?, runner = ?, lease_until = ?, started_at = ?,"
                " cancel_requested = 0 WHERE id = ? AND status = ?",
                (RUNNING, runner, now + lease_s, now, found, QUEUED),
            )
            return found if cur.rowcount == 1 else None

    def renew(self, job_id: str, runner: str, lease_s: float) -> tuple[bool, bool]:
        """Extend ``runner``'s lease; ``(still held, cancel requested)``."""
        with self.sql.transaction(write=True) as cur:
            cur.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = ? AND runner = ?",
                (time.time() + lease_s, job_id, RUNNING, runner),
            )
            held = cur.rowcount == 1
            flag = cur.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).scalar()
        return held, bool(flag)

    def request_cancel(self, job_id: str) -> bool:
        """Flag a running job for its runner (wherever it runs); True if it is running."""
        with self.sql.transaction(write=True) as cur:
            cur.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?", (job_id, RUNNING))
            return cur.rowcount == 1

    def running(self) -> list[dict]:
        """``{id, runner, lease_until, interruptions, ...}`` of every running job."""
        with self.sql.transaction() as cur:
            return cur.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (RUNNING,)).fetchall()

    def requeue_if(self, observed: dict, new: str, **fields) -> bool:
        """Move a running job to ``new`` (queued or failed) only if its runner and lease are still
        the ones in ``observed`` (a row of ``running()``); the lease is released."""
        cols = ", ".join(f"{k} = ?" for k in ("status", "runner", "lease_until", *fields))
        with self.sql.transaction(write=True) as cur:
            cur.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status = ? AND COALESCE(runner, '') = ?"
                " AND COALESCE(lease_until, 0) = ?",
                (
                    new,
                    None,
                    None,
                    *fields.values(),
                    observed["id"],
                    RUNNING,
                    observed["runner"] or "",
                    observed["lease_until"] or 0,
                ),
            )
            return cur.rowcount == 1

    # ---- reads -------------------------------------------------------------------------------
    def row(self, job_id: str) -> dict:
        """The whole row, bookkeeping columns included."""
        with self.sql.transaction() as cur:
            row = cur.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return row

    def get(self, job_id: str) -> dict:
        return public(self.row(job_id))

    def find_by_key(self, idempotency_key: str) -> dict | None:
        """The job submitted with this Idempotency-Key (with its ``request_hash``), if any."""
        with self.sql.transaction() as cur:
            row = cur.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return None if row is None else {**public(row), "request_hash": row["request_hash"]}

    def adapter_ids(self, *statuses: str) -> set[str]:
        """The ``adapter_id`` of every job in one of ``statuses``."""
        marks = ", ".join("?" for _ in statuses)
        with self.sql.transaction() as cur:
            rows = cur.execute(f"SELECT DISTINCT adapter_id FROM jobs WHERE status IN ({marks})", statuses)
            return {r["adapter_id"] for r in rows.fetchall()}

    def find_active(self, adapter_id: str, *statuses: str) -> dict | None:
        """The oldest job in one of ``statuses`` that trains ``adapter_id``, if any."""
        marks = ", ".join("?" for _ in statuses)
        query = f"SELECT * FROM jobs WHERE adapter_id = ? AND status IN ({marks}) ORDER BY seq LIMIT 1"
        with self.sql.transaction() as cur:
            row = cur.execute(query, (adapter_id, *statuses)).fetchone()
        return None if row is None else public(row)

    def count(self, status: str) -> int:
        with self.sql.transaction() as cur:
            return int(cur.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).scalar())

    def ids(self, status: str, limit: int = -1) -> list[str]:
        """Ids of the jobs in ``status``, oldest first."""
        query = "SELECT id FROM jobs WHERE status = ? ORDER BY seq"
        if limit >= 0:
            query += f" LIMIT {int(limit)}"
        with self.sql.transaction() as cur:
            return [r["id"] for r in cur.execute(query, (status,)).fetchall()]

    def pointers(self) -> list[dict]:
        """``{id, status, state_key}`` of every job (what the orphan collector keeps)."""
        with self.sql.transaction() as cur:
            return cur.execute("SELECT id, status, state_key FROM jobs").fetchall()

    def list(self, offset: int = 0, limit: int = 100) -> tuple[list[dict], int]:
        with self.sql.transaction() as cur:
            total = cur.execute("SELECT COUNT(*) FROM jobs").scalar()
            rows = cur.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset))
            return [public(r) for r in rows.fetchall()], int(total)

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        self.row(job_id)
        with self.sql.transaction() as cur:
            rows = cur.execute(
                "SELECT seq, time, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [{**r, "data": json.loads(r["data"])} for r in rows]

    def loss_curve(self, job_id: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """``(train, validation)`` as ``(step, loss)`` points, from the job's step and eval events."""
        self.row(job_id)
        train: list[tuple[int, float]] = []
        val: list[tuple[int, float]] = []
        with self.sql.transaction() as cur:
            rows = cur.execute(
                "SELECT type, data FROM events WHERE job_id = ? AND type IN ('step', 'eval') ORDER BY seq",
                (job_id,),
            ).fetchall()
        for r in rows:
            info = json.loads(r["data"])
            if isinstance(info.get("step"), int) and isinstance(info.get("loss"), int | float):
                (train if r["type"] == "step" else val).append((info["step"], float(info["loss"])))
        return train, val

    def stats(self) -> dict:
        """For metrics: jobs per status, training steps done (all jobs), and the latest train loss
        of the newest running job (else of the job that finished last; None if none has one)."""
        with self.sql.transaction() as cur:
            rows = cur.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
            counts = {r["status"]: int(r["n"]) for r in rows}
            steps = cur.execute("SELECT COALESCE(SUM(step), 0) FROM jobs").scalar()
            loss = cur.execute(
                "SELECT loss FROM jobs WHERE status = ? AND loss IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (RUNNING,),
            ).scalar()
            if loss is None:
                loss = cur.execute(
                    "SELECT loss FROM jobs WHERE finished_at IS NOT NULL AND loss IS NOT NULL"
                    " ORDER BY finished_at DESC LIMIT 1"
                ).scalar()
        return {
            "jobs": {s: counts.get(s, 0) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)},
            "steps": int(steps),
            "last_loss": loss,
        }
