"""A job's data and resume state as objects in the store's blob store (``server.jobs.jobfiles``):
checked on read, an unreachable store puts the job back in the queue (never fails it), damaged
data fails it saying so."""

from __future__ import annotations

import pytest

from adapters_store import Unavailable
from server.jobs.runner import FAILED, QUEUED, SUCCEEDED, JobRunner
from server.jobs.state import StateError
from tests.jobs.test_resume import setup, submit  # noqa: F401 (fixture)


def away(*args, **kwargs):
    raise Unavailable("storage", "the blob store is unreachable; retry")


def test_a_job_s_data_is_an_object_checked_on_read(setup):  # noqa: F811
    base, store, root = setup
    runner = JobRunner(base, store, root)
    job = submit(runner)
    row = runner.db.row(job)
    assert {i.key for i in store.blobs.list(f"jobs/{job}/")} == {
        f"jobs/{job}/train.jsonl",
        f"jobs/{job}/val.jsonl",
    }
    assert row["train_sha256"] and row["train_bytes"] > 0 and not (root / job).exists()
    path = store.blobs.local_path(f"jobs/{job}/train.jsonl")
    path.write_bytes(b"x" * row["train_bytes"])  # damaged behind the store's back
    runner.run_job(job)
    failed = runner.get(job)
    assert failed["status"] == FAILED and "checksum" in failed["error"]


def test_an_unreachable_store_requeues_the_job_and_it_runs_once_the_store_is_back(setup, monkeypatch):  # noqa: F811
    base, store, root = setup
    runner = JobRunner(base, store, root)
    job = submit(runner)
    monkeypatch.setattr(runner.files.objects, "get", away)
    runner.run_job(job)
    waiting = runner.get(job)
    assert waiting["status"] == QUEUED and waiting["error"] is None
    assert runner.events(job)[-1]["type"] == "requeued" and runner.db.row(job)["runner"] is None
    monkeypatch.undo()
    runner.run_job(job)
    assert runner.get(job)["status"] == SUCCEEDED


def test_a_state_unreadable_for_an_outage_is_not_a_damaged_one(setup, monkeypatch):  # noqa: F811
    base, store, root = setup
    runner = JobRunner(base, store, root)
    job = submit(runner)
    pointer = {"state_key": f"jobs/{job}/state-1", "state_sha256": "0" * 64, "state_bytes": 1}
    runner.db.update(job, status="running", runner="elsewhere", lease_until=0.0, **pointer)
    monkeypatch.setattr(runner.files.objects, "get", away)
    assert runner.recover_stale() == []  # decided at a later round, not failed
    assert runner.get(job)["status"] == "running"
    monkeypatch.undo()
    with pytest.raises(StateError, match="missing"):  # the store answers: a missing object is damage
        runner.files.load_state(runner.db.row(job))
    assert runner.recover_stale() == [job] and "cannot resume" in runner.get(job)["error"]
