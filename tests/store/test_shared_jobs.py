"""Training files and fine-tune jobs on every backend pair of the store: blob stores {local files,
a real S3-compatible server (moto)} x indexes {SQLite, a real PostgreSQL}, started on loopback by
``conftest.py`` (the same servers as ``test_backends_contract.py``).

Two "replicas" share one store: two ``AdapterStore`` instances (and two ``FileStore``/``JobRunner``
instances with runner ids ``replica-a`` and ``replica-b``) on the same backends; with SQLite they
share its file, as replicas on one machine share ``<data_dir>``. Claims, leases and recoveries
are driven by direct calls, never by waiting: a lease is made to expire by writing its end into
the past.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from adapters_store import AdapterStore, Corrupt
from adapters_store.blobs_s3 import S3BlobStore
from adapters_store.index_pg import PostgresIndex
from adapters_store.objects import ObjectStore
from server.jobs.files import FileNotFound, FileStore, object_key
from server.jobs.jobdb import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from server.jobs.runner import JobRunner, JobSpec
from tests.jobs.test_resume import DATA, HP, Crash
from tests.jobs.test_train import tiny_base

from . import backend_servers as servers

PAIRS = [(b, i) for b in ("local", "s3") for i in ("sqlite", "postgres")]
JSONL = DATA.encode()


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def spec(request, tmp_path):
    blob, index = request.param
    spec = {"root": tmp_path / "shared", "blob": blob, "index": index, "dsn": None}
    if blob == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        spec |= {"endpoint": endpoint, "bucket": servers.new_bucket(endpoint)}
    if index == "postgres":
        spec["dsn"] = servers.new_database(request.getfixturevalue("pg_server"))
    return spec


class Replica:
    """One replica's view of the shared store: its adapter store, training files and runner."""

    def __init__(self, spec: dict, name: str, base, **runner_kw):
        # Local files and SQLite are one folder shared by the replicas (one machine); with S3 and
        # PostgreSQL each replica has its own folder (its cache) and shares nothing locally.
        shared_locally = spec["blob"] == "local" or spec["index"] == "sqlite"
        root = spec["root"] if shared_locally else spec["root"] / name
        blobs = None
        if spec["blob"] == "s3":
            blobs = S3BlobStore(spec["bucket"], "facet", endpoint_url=spec["endpoint"])
        index = PostgresIndex(spec["dsn"]) if spec["dsn"] else None
        self.store = AdapterStore(root / "adapters", base.module_shapes, base.name, blobs=blobs, index=index)
        objects = ObjectStore(self.store.blobs, self.store.cache)
        self.files = FileStore(root / "files", objects=objects, index_url=spec["dsn"])
        self.jobs = JobRunner(
            base, self.store, root / "jobs", index_url=spec["dsn"], runner_id=name, **runner_kw
        )

    def close(self) -> None:
        self.jobs.db.close()
        self.files.close()
        self.store.close()


@pytest.fixture
def replicas(spec):
    base = tiny_base()
    opened = []

    def _open(name: str, **runner_kw) -> Replica:
        opened.append(Replica(spec, name, base, **runner_kw))
        return opened[-1]

    yield _open
    for replica in opened:
        replica.close()


def submit(runner: JobRunner, adapter_id: str, **hp) -> str:
    spec = JobSpec(adapter_id, "lora", DATA, {"r": 2}, None, {**HP, **hp}, validation_data=DATA)
    return runner.submit(spec)["id"]


def expire_lease(runner: JobRunner, job_id: str) -> None:
    runner.db.update(job_id, lease_until=time.time() - 1)


# ---- training files --------------------------------------------------------------------------


def test_a_file_uploaded_through_one_replica_is_read_and_deleted_through_another(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    info = a.files.put("train.jsonl", "fine-tune", JSONL)
    assert b.files.get(info["id"]) == info and b.files.list() == [info]
    assert b.files.text(info["id"]).encode() == JSONL
    assert b.files.objects.blobs.exists(object_key(info["id"]))  # one object, in the shared store

    b.files.delete(info["id"])
    for replica in (a, b):
        with pytest.raises(FileNotFound):
            replica.files.get(info["id"])
        assert replica.files.list() == []
    with a.files.db.transaction() as cur:  # the delete is a tombstone every replica sees
        assert cur.execute("SELECT id FROM training_file_tombstones").fetchall() == [{"id": info["id"]}]
    assert not a.files.objects.blobs.exists(object_key(info["id"]))


def test_a_damaged_file_object_is_refused_on_every_replica(replicas, spec):
    a, b = replicas("replica-a"), replicas("replica-b")
    info = a.files.put("train.jsonl", "fine-tune", JSONL)
    key = object_key(info["id"])
    damaged = JSONL[:-2] + b"X\n"
    if spec["blob"] == "s3":  # behind the store's back: a plain put, no conditional create
        raw = a.store.blobs._s3
        raw.put_object(Bucket=spec["bucket"], Key="facet/" + key, Body=damaged)
    else:
        a.files.objects.blobs.local_path(key).write_bytes(damaged)
    for replica in (a, b):
        with pytest.raises(Corrupt, match="checksum"):
            replica.files.text(info["id"])


def test_an_orphan_file_object_is_collected_once_older_than_the_grace_period(replicas):
    a = replicas("replica-a")
    orphan = object_key("file-" + "0" * 24)
    a.files.objects.put(orphan, b"an upload that died before its row")
    assert a.files.gc(grace_s=3600) == 0 and a.files.objects.blobs.exists(orphan)  # may be in flight
    assert a.files.gc(grace_s=0) == 1 and not a.files.objects.blobs.exists(orphan)


# ---- claims ----------------------------------------------------------------------------------


def test_two_runners_on_one_shared_table_claim_a_job_exactly_once(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    first = submit(a.jobs, "first")
    assert b.jobs.get(first)["status"] == QUEUED  # every replica sees every job
    assert a.jobs.claim_next() == first
    assert b.jobs.claim_next() is None  # nothing left to take
    b.jobs.run_job(first)  # not queued any more: left alone
    row = b.jobs.db.row(first)
    assert row["status"] == RUNNING and row["runner"] == "replica-a" and row["lease_until"] > time.time()

    second = submit(b.jobs, "second")
    assert b.jobs.claim_next() == second and a.jobs.claim_next() is None
    assert [j["id"] for j in a.jobs.list()[0]] == [second, first]


def test_racing_claims_take_every_job_once(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    queued = {submit(a.jobs, f"job{i}", max_steps=1) for i in range(6)}
    claims: dict[str, list[str]] = {"replica-a": [], "replica-b": []}
    start = threading.Barrier(4)

    def claim_all(runner: JobRunner) -> None:
        start.wait()
        while (job_id := runner.claim_next()) is not None:
            claims[runner.runner_id].append(job_id)

    threads = [threading.Thread(target=claim_all, args=(r.jobs,)) for r in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = claims["replica-a"] + claims["replica-b"]
    assert sorted(taken) == sorted(queued)  # each job claimed once, none twice, none missed
    for job_id in queued:
        row = a.jobs.db.row(job_id)
        assert row["status"] == RUNNING and job_id in claims[row["runner"]]


# ---- leases ----------------------------------------------------------------------------------


def test_only_an_expired_lease_is_recovered_and_the_job_resumes_on_the_other_replica(replicas):
    a, b = replicas("replica-a", state_every_s=None), replicas("replica-b", state_every_s=None)
    job = submit(a.jobs, "tuned")

    def crash_at_step_3():
        if a.jobs.get(job)["step"] >= 3:
            raise Crash  # replica a stops answering: its lease is not renewed any more
        return False

    a.jobs.busy = crash_at_step_3
    with pytest.raises(Crash):
        a.jobs.run_job(job)
    assert a.jobs.get(job)["status"] == RUNNING and a.jobs.db.row(job)["state_step"] == 2

    assert b.jobs.recover_stale() == []  # replica a's lease is still running: its job
    restarted = replicas("replica-c")  # a replica that (re)starts recovers at open: not this job
    assert restarted.jobs.db.row(job)["runner"] == "replica-a" and b.jobs.get(job)["status"] == RUNNING
    expire_lease(a.jobs, job)
    assert b.jobs.recover_stale() == [job] and a.jobs.recover_stale() == []  # recovered once
    requeued = b.jobs.get(job)
    assert requeued["status"] == QUEUED and requeued["step"] == 2 and requeued["interruptions"] == 1

    b.jobs.run_job(job)  # replica b resumes from the state replica a saved in the shared store
    done = b.jobs.get(job)
    assert done["status"] == SUCCEEDED and done["resumed_from"] == 2 and done["runner"] == "replica-b"
    # The adapter is in the shared store: every replica serves it at once.
    assert a.store.current_version("tuned") == 1 == b.store.current_version("tuned")
    assert a.store.load("tuned", 1).family == "lora"
    assert [i.key for i in a.store.blobs.list(f"jobs/{job}/") if "/state-" in i.key] == []


def test_a_runner_that_lost_its_lease_writes_nothing(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    job = submit(a.jobs, "tuned")
    assert a.jobs.claim_next() == job
    assert a.jobs.db.renew(job, "replica-a", 30) == (True, False)
    expire_lease(a.jobs, job)
    assert b.jobs.recover_stale() == [job]  # no state saved yet: failed, saying why
    assert b.jobs.get(job)["status"] == FAILED and "before any resumable state" in b.jobs.get(job)["error"]
    # Replica a comes back: its heartbeat learns it lost the job, its fenced writes change nothing.
    assert a.jobs.db.renew(job, "replica-a", 30) == (False, False)
    assert not a.jobs.db.update(job, owner="replica-a", step=99)
    assert b.jobs.get(job)["step"] == 0


def test_a_cancel_through_one_replica_reaches_the_runner_on_another(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    job = submit(a.jobs, "tuned", max_steps=50)
    beats = []

    def cancel_through_b_then_beat():  # after a's first step; then what a's heartbeat does
        if not beats:
            assert b.jobs.cancel(job)["status"] == RUNNING  # requested; the runner ends it
        held, cancel = a.jobs.db.renew(job, "replica-a", a.jobs.lease_s)
        beats.append((held, cancel))
        if cancel:
            a.jobs._cancel.add(job)
        return False

    a.jobs.busy = cancel_through_b_then_beat
    a.jobs.run_job(job)
    assert beats[0] == (True, True)
    done = b.jobs.get(job)
    assert done["status"] == CANCELLED and done["step"] == 1 and b.store.current_version("tuned") is None
    assert "cancel_requested" in [e["type"] for e in b.jobs.events(job)]


def test_submits_on_two_replicas_cannot_queue_two_jobs_for_one_adapter(replicas):
    a, b = replicas("replica-a"), replicas("replica-b")
    submit(a.jobs, "twin")
    b.jobs._check_new_id = lambda adapter_id: None  # as if b checked before a's row existed
    with pytest.raises(Exception, match="already trains this adapter id"):
        submit(b.jobs, "twin")
    assert b.jobs.list()[1] == 1
    assert {i.key.split("/")[1] for i in b.store.blobs.list("jobs/")} == {a.jobs.list()[0][0]["id"]}


def test_rows_keep_their_bookkeeping_private(replicas):
    a = replicas("replica-a")
    job = a.jobs.get(submit(a.jobs, "tuned"))
    hidden = {"lease_until", "state_key", "state_sha256", "train_sha256", "cancel_requested", "seq"}
    assert not hidden & set(job) and json.dumps(job)


# ---- kill -9 between an object and its row ----------------------------------------------------

CRASH = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import adapters_store.objects as objects
    spec, stage = json.loads(sys.argv[1]), sys.argv[2]
    spec["root"] = Path(spec["root"])
    objects.fault_point = lambda point: os._exit(9) if point == stage else None
    from tests.jobs.test_train import tiny_base
    from tests.store.test_shared_jobs import JSONL, Replica, submit
    replica = Replica(spec, "replica-a", tiny_base())
    if stage.startswith("file"):
        replica.files.put("train.jsonl", "fine-tune", JSONL)
    else:
        submit(replica.jobs, "tuned")
    os._exit(0)
    """
)


@pytest.mark.parametrize("stage", ["file_object_written", "file_committed", "job_data_written"])
def test_kill9_between_an_object_and_its_row_leaves_no_row_without_its_object(spec, replicas, stage):
    args = [sys.executable, "-c", CRASH, json.dumps({**spec, "root": str(spec["root"])}), stage]
    repo = Path(__file__).resolve().parents[2]
    assert subprocess.run(args, cwd=repo, env=os.environ.copy(), timeout=120).returncode == 9
    b = replicas("replica-b")  # opening runs the collector (grace 0 locally, 15 minutes on S3)
    b.files.gc(grace_s=0)
    b.jobs.files.gc(grace_s=0)
    files, (jobs, _) = b.files.list(), b.jobs.list()
    objects = {i.key for i in b.store.blobs.list("files/")} | {i.key for i in b.store.blobs.list("jobs/")}
    if stage == "file_committed":  # the row and its object are both there, and whole
        assert [f["records"] for f in files] == [7] and b.files.text(files[0]["id"]).encode() == JSONL
        assert objects == {object_key(files[0]["id"])}
    else:  # no row; the orphan object is gone
        assert files == [] and jobs == [] and objects == set()
