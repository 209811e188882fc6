"""The job runner: validation before work, SQLite persistence, events, cancel, restart, storing."""

from __future__ import annotations

import json
import time

import pytest

from adapters_store import AdapterStore
from server.engine.loader import wrap_model
from server.jobs.runner import (
    CANCELLED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    JobConflict,
    JobInvalid,
    JobRunner,
    JobSpec,
)
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.engine.helpers import TARGETS

DATA = "".join(
    json.dumps({"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"}) + "\n"
    for i in range(4)
)


@pytest.fixture
def setup(tmp_path):
    base = wrap_model("tiny", make_tiny_llama(), make_tokenizer(), TARGETS)
    store = AdapterStore(tmp_path / "store", base.module_shapes, base.name)
    yield base, store, tmp_path / "jobs"
    store.close()


def spec(**kw) -> JobSpec:
    args = {
        "adapter_id": "my-job",
        "method": "lora",
        "training_data": DATA,
        "validation_data": DATA,
        "config": {"r": 2},
        "hyperparameters": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2},
    }
    return JobSpec(**{**args, **kw})


@pytest.mark.parametrize(
    "kw, where, needle",
    [
        ({"adapter_id": "bad/id"}, "adapter_id", "letters"),
        ({"adapter_id": "x@3"}, "adapter_id", "letters"),
        ({"adapter_id": "tiny"}, "adapter_id", "base model"),
        ({"method": "nope"}, "method", "unknown adapter family"),
        ({"config": {"r": 0}}, "config.r", "greater than or equal"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate", "greater than"),
        ({"hyperparameters": {"bogus": 1}}, "hyperparameters.bogus", "Extra inputs"),
        ({"training_data": DATA + "{oops\n"}, "training_data", "line 5: invalid JSON"),
        ({"validation_data": '{"prompt": "t1"}'}, "validation_data", "line 1: "),
    ],
)
def test_invalid_jobs_are_refused_before_anything_is_queued(setup, kw, where, needle):
    base, store, root = setup
    runner = JobRunner(base, store, root)
    with pytest.raises(JobInvalid) as exc:
        runner.submit(spec(**kw))
    assert exc.value.where == where and needle in exc.value.message
    assert runner.list() == ([], 0)


def test_a_job_runs_to_a_stored_adapter_with_events_and_checkpoints(setup):
    base, store, root = setup
    stored = []

    class Publisher:  # stands in for the app's adapter service: every store goes through it
        def put(self, adapter_id, config, weights):
            record = store.put(adapter_id, config, weights)
            stored.append((record.adapter_id, record.version))
            return record

    runner = JobRunner(base, store, root, adapters=Publisher())
    hp = {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "checkpoint_every": 2}
    job = runner.submit(spec(hyperparameters=hp))
    assert job["status"] == QUEUED and job["n_train"] == 4 and job["n_val"] == 4
    runner.run_job(job["id"])
    job = runner.get(job["id"])
    assert job["status"] == SUCCEEDED, job["error"]
    assert job["step"] == 4 and job["total_steps"] == 4
    result = job["result"]
    assert result["adapter_id"] == "my-job" and result["steps"] == 4
    assert result["val_loss_after"] < result["val_loss_before"]
    assert store.get("my-job").family == "lora"
    assert store.get("my-job@2").family == "lora"  # checkpoint
    assert stored == [("my-job@2", 1), ("my-job", 1)]
    kinds = [e["type"] for e in runner.events(job["id"])]
    assert kinds[:2] == ["created", "started"] and kinds[-1] == SUCCEEDED
    assert kinds.count("step") == 4 and "checkpoint" in kinds and kinds.count("eval") == 2
    assert [e["seq"] for e in runner.events(job["id"], after=3)][0] == 4
    # A job trains a new adapter: an id that exists is refused before anything is queued.
    with pytest.raises(JobInvalid, match="exists") as exc:
        runner.submit(spec())
    assert exc.value.where == "adapter_id" and runner.list()[1] == 1


def test_an_id_taken_by_an_active_job_is_refused(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root)
    first = runner.submit(spec(adapter_id="twin"))
    with pytest.raises(JobInvalid, match="queued or running job"):
        runner.submit(spec(adapter_id="twin"))
    runner.cancel(first["id"])
    assert runner.submit(spec(adapter_id="twin"))["status"] == QUEUED  # free again


def test_cancel_queued_running_and_finished(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root)
    queued = runner.submit(spec())
    assert runner.cancel(queued["id"])["status"] == CANCELLED
    runner.run_job(queued["id"])  # no-op: not queued any more
    assert runner.get(queued["id"])["status"] == CANCELLED
    with pytest.raises(JobConflict):
        runner.cancel(queued["id"])

    running = runner.submit(spec(adapter_id="other", hyperparameters={"max_steps": 50, "batch_size": 2}))
    runner.busy = lambda: bool(runner.cancel(running["id"])) and False  # cancel after the first step
    runner.run_job(running["id"])
    job = runner.get(running["id"])
    assert job["status"] == CANCELLED and job["step"] == 1
    assert "cancel_requested" in [e["type"] for e in runner.events(running["id"])]
    assert store.current_version("other") is None  # nothing stored


def test_restart_marks_interrupted_jobs_failed_and_keeps_the_rest(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root)
    a = runner.submit(spec())
    b = runner.submit(spec(adapter_id="b"))
    runner.db.update(a["id"], status="running")
    again = JobRunner(base, store, root)
    assert again.get(a["id"])["status"] == FAILED
    assert "interrupted" in again.get(a["id"])["error"]
    assert again.get(b["id"])["status"] == QUEUED


def test_the_worker_thread_trains_queued_jobs(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root, busy=lambda: False)
    runner.start()
    try:
        job = runner.submit(spec())
        deadline = time.monotonic() + 30
        while runner.get(job["id"])["status"] not in (SUCCEEDED, FAILED):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert runner.get(job["id"])["status"] == SUCCEEDED
    finally:
        runner.stop()
