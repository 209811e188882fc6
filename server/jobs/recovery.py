"""Taking back fine-tune jobs whose runner is gone, on whichever replica notices first.

A running job is *stale* when its lease ran out (``lease_until`` in the past, or none: a row
from before leases) or its runner is known dead (``lease.runner_is_dead``). ``recover_job``
decides what becomes of it from what the shared store holds (its last resume state, how often
it was interrupted) and then writes that with one compare-and-set on the runner and lease it
observed (``JobDB.requeue_if``): two replicas recovering at once recover it once, and a runner
that renewed its lease meanwhile keeps its job.
"""

from __future__ import annotations

import time

from .jobdb import FAILED, QUEUED, JobDB
from .jobfiles import JobFiles
from .lease import runner_is_dead
from .state import StateError

REASON = "interrupted: the server stopped while this job was running"


def is_stale(row: dict, me: str, now: float) -> bool:
    expired = row["lease_until"] is None or row["lease_until"] < now
    return expired or runner_is_dead(row["runner"], me)


def finished(db: JobDB, files: JobFiles, row: dict, status: str, data: dict) -> None:
    """After a job's terminal write: its terminal event, and its resume state removed."""
    db.event(row["id"], status, data)
    files.drop_state(row)


def _verdict(files: JobFiles, row: dict, state_every_s: float | None, max_interruptions: int):
    """``(error or None, step to resume from)`` for a stale job."""
    if not files.has_state(row):
        every = f" and every {state_every_s:g} s" if state_every_s else ""
        saved = f"saved at each checkpoint_every step{every}"
        return f"{REASON}, before any resumable state was saved ({saved})", None
    try:
        step = files.load_state(row).step
    except StateError as e:
        return f"{REASON}; cannot resume: {e}", None
    crashes = row["interruptions"] + 1
    if crashes > max_interruptions:
        return f"{REASON}, {crashes} times; not resumed again", None
    return None, step


def recover_job(
    db: JobDB, files: JobFiles, row: dict, state_every_s: float | None, max_interruptions: int
) -> bool:
    """Queue a stale job to resume from its last state, or fail it saying why; False if the row
    changed since it was observed (another replica recovered it, or its runner came back)."""
    crashes = row["interruptions"] + 1
    error, step = _verdict(files, row, state_every_s, max_interruptions)
    if error is not None:
        if not db.requeue_if(row, FAILED, interruptions=crashes, finished_at=time.time(), error=error):
            return False
        finished(db, files, db.row(row["id"]), FAILED, {"error": error})
        return True
    if not db.requeue_if(row, QUEUED, interruptions=crashes, step=step, eta_s=None):
        return False
    db.event(row["id"], "requeued", {"step": step, "reason": f"{REASON}; resumes from step {step}"})
    return True
