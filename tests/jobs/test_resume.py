"""Resuming fine-tune jobs: after a crash or a shutdown a job goes on from its saved state and ends
with exactly the weights of an uninterrupted run; without a usable state it fails saying why."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_store import AdapterStore
from adapters_store.objects import sha256_hex
from server.jobs.runner import FAILED, QUEUED, RESUME_FILE, RUNNING, SUCCEEDED, JobRunner, JobSpec
from server.jobs.state import StateError, load_state, save_state
from server.jobs.train import train_adapter
from tests.jobs.test_train import FAMILIES, RECORDS, hp, tiny_base

# 7 records, batch 2, grad_accum 2: 4 micro-batches, 2 optimizer steps per epoch, so a stop at
# step 3 lands mid-epoch and the resume must replay that epoch's shuffle and skip its first step.
MORE = RECORDS + RECORDS[:3]


def run(family, *, stop_at=None, resume=None, states=None, weight_decay=0.0):
    config, lr, _ = FAMILIES[family]
    seen = []
    adapter, history = train_adapter(
        tiny_base(),
        family,
        config,
        None,
        MORE,
        RECORDS,
        hp(lr, max_steps=7, batch_size=2, grad_accum=2, weight_decay=weight_decay),
        on_step=seen.append,
        should_stop=(lambda: len(seen) >= stop_at) if stop_at else None,
        resume=resume,
        on_state=None if states is None else states.append,
    )
    return adapter, history


def same_weights(a, b) -> bool:
    return all(torch.equal(a.modules[p][n], b.modules[p][n]) for p in a.modules for n in a.modules[p])


@pytest.mark.parametrize("family", ["lora", "dct", "surm"])
def test_stop_and_resume_equals_an_uninterrupted_run(family, tmp_path):
    whole, whole_history = run(family)
    saved = []
    part, history = run(family, stop_at=3, states=saved)
    assert history.stopped and len(saved) == 1 and not same_weights(part, whole)
    path = tmp_path / RESUME_FILE
    save_state(path, saved[0])  # through the file, as the runner does
    state = load_state(path)
    assert (state.step, state.epoch, state.batch_offset) == (3, 1, 2)
    resumed, history = run(family, resume=state)
    assert history.resumed_from == 3 and history.last_step == 7
    assert same_weights(resumed, whole)
    assert [v["step"] for v in history.val] == [0, 7]  # the evaluation before training is kept
    assert history.val[-1]["loss"] == pytest.approx(whole_history.val[-1]["loss"], rel=1e-6)


def test_a_state_that_does_not_fit_is_refused(tmp_path):
    saved = []
    run("lora", stop_at=2, states=saved)
    state = saved[0]
    path = next(iter(state.params))
    state.params[path] = {n: t[..., :1].clone() for n, t in state.params[path].items()}
    with pytest.raises(StateError, match="shape"):
        run("lora", resume=state)
    (tmp_path / "bad").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(StateError):
        load_state(tmp_path / "bad")
    with pytest.raises(StateError, match="no resume state"):
        load_state(tmp_path / "missing")


# ---- the runner ----------------------------------------------------------------------------------

DATA = "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in MORE)
HP = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "learning_rate": 1e-2, "checkpoint_every": 2}


class Crash(BaseException):
    """Stands for the process dying: nothing in the runner catches it."""


@pytest.fixture
def setup(tmp_path):
    base = tiny_base()
    store = AdapterStore(tmp_path / "store", base.module_shapes, base.name)
    yield base, store, tmp_path / "jobs"
    store.close()


def submit(runner, adapter_id="tuned", **hp):
    spec = JobSpec(adapter_id, "lora", DATA, {"r": 2}, None, {**HP, **hp}, validation_data=DATA)
    return runner.submit(spec)["id"]


def final_weights(store, adapter_id) -> dict:
    from safetensors.torch import load_file

    return load_file(store.file_path(adapter_id, "adapter_model.safetensors"))


def test_a_crashed_job_resumes_from_its_checkpoint_with_the_same_result(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root, state_every_s=None)
    reference = submit(runner, "reference")
    runner.run_job(reference)
    assert runner.get(reference)["status"] == SUCCEEDED

    def crash_at_step_3():
        if runner.get(job)["step"] >= 3:
            raise Crash
        return False

    job = submit(runner)
    runner.busy = crash_at_step_3
    with pytest.raises(Crash):
        runner.run_job(job)
    assert runner.get(job)["status"] == RUNNING  # as a killed process leaves it
    assert store.current_version("tuned") is None and store.get("tuned@2") is not None

    again = JobRunner(base, store, root, state_every_s=None)
    got = again.get(job)
    assert got["status"] == QUEUED and got["interruptions"] == 1 and got["step"] == 2
    requeued = [e for e in again.events(job) if e["type"] == "requeued"]
    assert "resumes from step 2" in requeued[0]["data"]["reason"]
    again.run_job(job)
    done = again.get(job)
    assert done["status"] == SUCCEEDED and done["resumed_from"] == 2 and done["step"] == 6
    assert done["result"]["steps"] == 6 and done["result"]["resumed_from"] == 2
    assert again.db.row(job)["state_key"] is None  # cleaned up
    assert [i.key for i in store.blobs.list(f"jobs/{job}/") if "state" in i.key] == []
    assert [e["type"] for e in again.events(job)].count("resumed") == 1
    ref, out = final_weights(store, "reference"), final_weights(store, "tuned")
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)


def test_a_graceful_stop_pauses_the_job_and_the_next_start_finishes_it(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root, state_every_s=None)
    job = submit(runner, checkpoint_every=0)

    def stop_after_step_2():
        if runner.get(job)["step"] >= 2:
            runner._stop.set()
        return False

    runner.busy = stop_after_step_2
    runner.run_job(job)
    paused = runner.get(job)
    assert paused["status"] == QUEUED and paused["step"] == 2
    assert [e["type"] for e in runner.events(job)][-1] == "paused"
    assert runner.files.load_state(runner.db.row(job)).step == 2  # in the store's blobs

    again = JobRunner(base, store, root)
    assert again.get(job)["interruptions"] == 0  # a pause is not a crash
    again.run_job(job)
    assert again.get(job)["status"] == SUCCEEDED and again.get(job)["resumed_from"] == 2


def test_no_state_damaged_state_or_too_many_crashes_fail_with_the_reason(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root, max_interruptions=1)
    jobs = {name: submit(runner, name) for name in ("none", "damaged", "rotten", "legacy", "looping")}
    for job in jobs.values():
        runner.db.update(job, status=RUNNING, runner=runner.runner_id)
    garbage = b"not a safetensors file"
    for name, blob in (("damaged", garbage), ("rotten", b"x" * len(garbage))):
        key = f"jobs/{jobs[name]}/state-00000001-{name}.safetensors"
        store.blobs.put(key, blob)  # "rotten": its bytes changed after the row recorded them
        pointer = {"state_key": key, "state_sha256": sha256_hex(garbage), "state_bytes": len(garbage)}
        runner.db.update(jobs[name], **pointer)
    (root / jobs["legacy"]).mkdir()  # a job of the earlier layout: its state in its own folder
    (root / jobs["legacy"] / RESUME_FILE).write_bytes(garbage)
    saved = []
    run("lora", stop_at=1, states=saved)
    assert runner.files.save_state(jobs["looping"], runner.runner_id, saved[0])
    runner.db.update(jobs["looping"], interruptions=1)

    again = JobRunner(base, store, root, max_interruptions=1)
    errors = {name: again.get(job) for name, job in jobs.items()}
    assert all(j["status"] == FAILED for j in errors.values()), errors
    assert "before any resumable state was saved" in errors["none"]["error"]
    assert "damaged" in errors["damaged"]["error"] and "damaged" in errors["legacy"]["error"]
    assert "checksum" in errors["rotten"]["error"]
    assert "2 times" in errors["looping"]["error"]
    assert not (root / jobs["legacy"] / RESUME_FILE).exists()
    assert [i.key for i in store.blobs.list("jobs/") if "/state-" in i.key] == []


def test_progress_fields(setup):
    base, store, root = setup
    runner = JobRunner(base, store, root)
    job = submit(runner, eval_every=2)
    runner.run_job(job)
    got = runner.get(job)
    assert got["epoch"] == 2 and got["tokens_per_s"] > 0 and got["eta_s"] is None
    evals = [e["data"]["loss"] for e in runner.events(job) if e["type"] == "eval"]
    assert len(evals) == 4 and got["val_loss"] == evals[-1]  # steps 0, 2, 4 and 6


def test_an_old_jobs_table_gains_the_new_columns(setup):
    import sqlite3

    base, store, root = setup
    root.mkdir(parents=True)
    db = sqlite3.connect(root / "jobs.sqlite3")
    db.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, adapter_id TEXT NOT NULL,"
        " method TEXT NOT NULL, config TEXT NOT NULL, target_modules TEXT, hyperparameters TEXT"
        " NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at"
        " REAL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER, loss REAL, n_train INTEGER"
        " NOT NULL, n_val INTEGER NOT NULL, error TEXT, result TEXT)"
    )
    db.commit()
    db.close()
    runner = JobRunner(base, store, root)
    job = submit(runner)
    assert runner.get(job)["interruptions"] == 0
