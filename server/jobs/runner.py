"""Fine-tune jobs: validated up front, persisted in the jobs table, trained one at a time in a thread.

Where things live (``docs/scale-out.md``, "Fine-tune jobs on a shared store"):

* the jobs and their events: ``server.jobs.jobdb`` (SQLite ``<root>/jobs.sqlite3`` by default, or
  the adapter index's PostgreSQL), so every replica sharing the store lists every job;
* each job's data and resume state: objects in the adapter store's blob store
  (``server.jobs.jobfiles``), so any replica can run or resume any job;
* what a job trains: the adapter store, as ``<adapter_id>@<step>`` checkpoints and the final
  ``<adapter_id>`` (which must be a new id, checked at submit): servable by every replica at once.

``submit`` validates everything that can be checked before work starts (adapter id, family
config against the base model, hyperparameters, every data line, tokenization) and raises
``JobInvalid`` naming the field, so an API answers 422 and nothing is queued. The worker thread
claims queued jobs in order (``JobDB.claim``: exactly one runner gets each, with a lease it renews
while it trains, ``server.jobs.lease``) and trains them on the *resident* base model
(``server.jobs.train``: its own per-thread binding, no model copy). After every optimizer step it
yields to serving: while ``busy()`` says requests are waiting it sleeps in short slices (at most
``max_pause_s`` per step, so training still progresses under constant load).

Statuses: queued -> running -> succeeded | failed | cancelled (queued -> cancelled directly).

Restarts: while a job trains, its resumable state (adapter tensors, optimizer, data order:
``server.jobs.state``) is saved at every checkpoint, every ``state_every_s`` seconds and when the
server shuts down. A graceful shutdown puts the running job back to ``queued``. A job found
``running`` whose runner is gone (its lease expired, or its process is known dead) is queued again
by whichever runner sees it first, to resume from its last saved state, or marked failed with the
reason when there is none (or after ``max_interruptions`` crashes); a job another live runner
holds is never touched. A resumed job ends with the same weights as an uninterrupted one. No job
stays ``running`` and no half-written adapter appears (the store's writes are atomic).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save as st_save

from adapters_store import objects as store_objects
from adapters_store.errors import StoreError, Unavailable
from adapters_store.objects import ObjectStore
from server.engine import threads
from server.engine.loader import BaseModel
from server.methods import Adapter, AdapterError

from .data import DataError
from .jobdb import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, JobDB, JobNotFound, public
from .jobfiles import LEGACY_STATE, JobFiles
from .lease import Heartbeat, local_runner_id
from .memory import TokenBudget
from .recovery import finished, is_stale, recover_job
from .spec import JobConflict, JobInvalid, JobQueueFull, JobSpec
from .state import StateError
from .train import TrainingError, train_adapter
from .validate import validate_spec

RESUME_FILE = LEGACY_STATE  # where jobs of the earlier layout kept their state (<root>/<job id>/)
DEFAULT_LEASE_S = 30.0


__all__ = ["CANCELLED", "FAILED", "QUEUED", "RUNNING", "SUCCEEDED", "TERMINAL", "JobNotFound"]
__all__ += ["JobConflict", "JobInvalid", "JobQueueFull", "JobRunner", "JobSpec"]


class JobRunner:
    def __init__(
        self,
        base: BaseModel,
        store,
        root: Path | str,
        *,
        busy: Callable[[], bool] | None = None,
        adapters=None,
        token_budget: TokenBudget | None = None,
        max_examples: int = 100_000,
        max_pause_s: float = 1.0,
        step_event_every: int = 1,
        state_every_s: float | None = 60.0,
        max_interruptions: int = 3,
        max_queued: int | None = 32,
        index_url: str | None = None,
        objects: ObjectStore | None = None,
        runner_id: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ):
        """``store``: the adapter store (its blob store and cache also hold the jobs' data unless
        ``objects`` is given). ``index_url``: ``None``/``"sqlite"`` for ``<root>/jobs.sqlite3``, or
        the adapter index's ``postgresql://`` DSN. ``runner_id``: this runner's name in the jobs
        table (default ``lease.local_runner_id()``); ``lease_s``: how long a claimed job stays
        this runner's without a heartbeat (renewed every third of it)."""
        self.base = base
        self.store = store
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.busy = busy
        # Where trained adapters and checkpoints are stored: the app's adapter service
        # (server.adapters_service), which also makes the engine forget a replaced version; the
        # store itself when none is given (no engine to tell). Reads (is the id taken?) use the store.
        self.adapters = adapters if adapters is not None else store
        # Training has its own tokenizer (a copy): tokenising a 100k-record file never holds the
        # lock serving tokenises under. Its lock only keeps submits and the worker apart.
        self.tokenizer = copy.deepcopy(base.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self.token_budget = token_budget
        self.max_examples = max_examples
        self.max_pause_s = max_pause_s
        self.step_event_every = max(1, step_event_every)
        self.state_every_s = state_every_s
        self.max_interruptions = max_interruptions
        self.max_queued = max_queued
        self.runner_id = runner_id or local_runner_id()
        self.lease_s = lease_s
        self._submit_lock = threading.Lock()
        self.db = JobDB(self.root / "jobs.sqlite3", index_url)
        if objects is None:
            objects = ObjectStore(store.blobs, store.cache)
        self.files = JobFiles(objects, self.db, self.root)
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._cancel: set[str] = set()
        self._lost: set[str] = set()  # jobs whose lease another runner took over
        self._active: set[str] = set()  # jobs this runner is training now
        self._thread: threading.Thread | None = None
        self._next_recovery = 0.0
        self.recover_stale()
        self.files.gc(getattr(store, "orphan_grace_s", 0.0))

    def recover_stale(self) -> list[str]:
        """Take back every running job whose runner is gone (``recovery.is_stale``) and that this
        runner is not training: queue it to resume, or fail it saying why. Returns the ids
        recovered here (another replica recovering the same job at once gets none)."""
        now = time.time()
        recovered = []
        for row in self.db.running():
            if row["id"] in self._active or not is_stale(row, self.runner_id, now):
                continue
            try:
                if recover_job(self.db, self.files, row, self.state_every_s, self.max_interruptions):
                    recovered.append(row["id"])
            except Unavailable:  # the blob store is away: decide at the next round
                continue
        self._next_recovery = time.monotonic() + self.lease_s / 3
        if recovered:
            with self._wake:
                self._wake.notify_all()
        return recovered

    # ---- storage ---------------------------------------------------------------------------
    def _finish(self, job_id: str, status: str, *, error: str | None = None, result: dict | None = None):
        """End a job this runner holds (a write fenced on its lease: a runner that lost the job
        changes nothing)."""
        done = self.db.update(
            job_id,
            owner=self.runner_id,
            status=status,
            finished_at=time.time(),
            error=error,
            result=None if result is None else json.dumps(result),
            eta_s=None,
            lease_until=None,
        )
        if done:
            self._finished(self.db.row(job_id), status, {"error": error} if error else (result or {}))

    def _finished(self, row: dict, status: str, data: dict) -> None:
        finished(self.db, self.files, row, status, data)

    # ---- public API ------------------------------------------------------------------------
    def validate(self, spec: JobSpec):
        """Everything checkable before training (``server.jobs.validate``); raises
        ``JobInvalid(where, message)``, returns the hyperparameters and the tokenized examples."""
        return validate_spec(
            spec,
            self.base,
            self.tokenizer,
            tokenizer_lock=self._tokenizer_lock,
            max_examples=self.max_examples,
            token_budget=self.token_budget,
        )

    def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> dict:
        """Validate and queue a job. With an ``idempotency_key`` already used for the same request,
        return that job (``replayed: True``) instead of queueing another one; the same key with a
        different request is ``JobInvalid``. ``JobQueueFull`` when ``max_queued`` jobs wait."""
        request_hash = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()
        if idempotency_key is not None:
            replay = self._replay(idempotency_key, request_hash)
            if replay is not None:
                return replay
        _, train, val = self.validate(spec)
        with self._submit_lock:  # the key check and the insert are one step
            if idempotency_key is not None:
                replay = self._replay(idempotency_key, request_hash)
                if replay is not None:
                    return replay
            self._check_new_id(spec.adapter_id)
            if self.max_queued is not None and self.db.count(QUEUED) >= self.max_queued:
                raise JobQueueFull(f"{self.max_queued} jobs are already queued; try again later")
            job_id = self._create(spec, train, val, idempotency_key, request_hash)
        if isinstance(job_id, dict):  # the key was used on another replica meanwhile
            return job_id
        with self._wake:
            self._wake.notify_all()
        return self.get(job_id)

    def _check_new_id(self, adapter_id: str) -> None:
        """A job trains a *new* adapter: the id must not be stored nor taken by an active job."""
        if self.store.current_version(adapter_id) is not None:
            raise JobInvalid("adapter_id", "an adapter with this id exists; choose a new id (or delete it)")
        if adapter_id in self.db.adapter_ids(QUEUED, RUNNING):
            raise JobInvalid("adapter_id", "a queued or running job already trains this adapter id")

    def active_job_for(self, adapter_id: str) -> dict | None:
        """The queued or running job that will store ``adapter_id`` (its final id, or one of its
        ``<id>@<step>`` checkpoints), or None."""
        return self.db.find_active(adapter_id.split("@", 1)[0], QUEUED, RUNNING)

    def _publish_conflict(self, job_id: str, adapter_id: str, adapter: Adapter, step: int) -> bool:
        """Whether ``adapter_id`` was created while the job ran (by a path that did not check for
        it): then the job fails saying so and the adapter found there is left alone; the trained
        one is kept as ``<id>@<step>`` when that id is free."""
        taken = self.store.current_version(adapter_id)
        if taken is None:
            return False
        message = f"adapter '{adapter_id}' was created (version {taken}) while this job ran; not replaced"
        fallback = f"{adapter_id}@{step}"
        if self.store.current_version(fallback) is None:
            self._put(fallback, adapter)
            message += f"; the trained adapter is stored as '{fallback}'"
        self.db.event(job_id, "publish_refused", {"adapter_id": adapter_id, "version": taken})
        self._finish(job_id, FAILED, error=message)
        return True

    def _replay(self, idempotency_key: str, request_hash: str) -> dict | None:
        job = self.db.find_by_key(idempotency_key)
        if job is None:
            return None
        if job.pop("request_hash") != request_hash:
            raise JobInvalid("Idempotency-Key", "this key was used for a different request")
        return {**job, "replayed": True}

    def _create(self, spec: JobSpec, train, val, idempotency_key, request_hash) -> str | dict:
        """The job's data objects first, then its row (refused in the row's own transaction if
        another replica queued the same key or adapter id meanwhile: then this job's data goes)."""
        job_id = "ft-" + uuid.uuid4().hex[:16]
        data = self.files.write_data(job_id, spec.training_data, spec.validation_data)
        store_objects.fault_point("job_data_written")
        refused = self.db.insert(
            job_id,
            adapter_id=spec.adapter_id,
            method=spec.method.lower(),
            config=json.dumps(spec.config or {}),
            target_modules=json.dumps(spec.target_modules),
            hyperparameters=json.dumps(spec.hyperparameters or {}),
            n_train=len(train),
            n_val=len(val or []),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            **data,
        )
        if refused is not None:
            self.files.discard_data(job_id)
            replay = self._replay(idempotency_key, request_hash) if refused == "key" else None
            if replay is not None:
                return replay
            raise JobInvalid("adapter_id", "a queued or running job already trains this adapter id")
        self.db.event(job_id, "created", {"n_train": len(train), "n_val": len(val or [])})
        return job_id

    def get(self, job_id: str) -> dict:
        return self.db.get(job_id)

    def list(self, offset: int = 0, limit: int = 100) -> tuple[list[dict], int]:
        return self.db.list(offset, limit)

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        return self.db.events(job_id, after, limit)

    def loss_curve(self, job_id: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        return self.db.loss_curve(job_id)

    def stats(self) -> dict:
        return self.db.stats()

    def cancel(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise JobConflict(f"the job is already {job['status']}")
        if self.db.transition(job_id, QUEUED, CANCELLED, finished_at=time.time()):
            self.db.event(job_id, CANCELLED, {})
        elif self.db.request_cancel(job_id):  # running: its runner's heartbeat reads the flag
            if job_id in self._active:  # here: the training loop checks this before every step
                self._cancel.add(job_id)
            self.db.event(job_id, "cancel_requested", {})
        return self.get(job_id)

    # ---- worker thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="facet-finetune", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop the worker and release the jobs table's connections (PostgreSQL's pool)."""
        self.stop()
        self.db.close()

    def _loop(self) -> None:
        threads.serial()  # claims and bookkeeping only; training runs in its own thread
        while not self._stop.is_set():
            try:
                if time.monotonic() >= self._next_recovery:
                    self.recover_stale()
                job_id = self.claim_next()
            except StoreError:  # the index is away (Unavailable): try again shortly
                job_id = None
            if job_id is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            self._train(job_id)

    def claim_next(self) -> str | None:
        """Claim the oldest queued job for this runner (exactly one runner gets it); its id or None."""
        return self.db.claim(self.runner_id, self.lease_s)

    def _yield_to_serving(self) -> None:
        if self.busy is None:
            return
        deadline = time.perf_counter() + self.max_pause_s
        while self.busy() and time.perf_counter() < deadline and not self._stop.is_set():
            time.sleep(0.005)

    def _put(self, adapter_id: str, adapter: Adapter):
        config = json.dumps(adapter.config.model_dump(mode="json"), sort_keys=True).encode()
        weights = st_save(adapter.state_dict(), metadata={"format": "pt"})
        return self.adapters.put(adapter_id, config, weights)

    def run_job(self, job_id: str) -> None:
        """Claim one queued job and train it to its end (tests call it directly; a job that is
        not queued, e.g. cancelled or claimed by another runner, is left alone)."""
        if self.db.claim(self.runner_id, self.lease_s, job_id) is not None:
            self._train(job_id)

    def _train(self, job_id: str) -> None:
        """Train a job this runner has claimed, renewing its lease meanwhile."""
        self._active.add(job_id)
        beat = Heartbeat(
            lambda: self.db.renew(job_id, self.runner_id, self.lease_s),
            self.lease_s / 3,
            on_lost=lambda: self._lost.add(job_id),
            on_cancel=lambda: self._cancel.add(job_id),
        )
        try:
            with beat:  # in a thread of its own: its OpenMP pool ends with the job (engine/threads.py)
                threads.run_parallel(self._train_claimed, job_id, name="facet-finetune-job")
        finally:
            self._active.discard(job_id)
            self._lost.discard(job_id)
            self._cancel.discard(job_id)

    def _release(self, job_id: str, reason: str) -> None:
        """Give a claimed job back to the queue (the store is away); wait a moment before the
        next claim, so an outage is not a busy loop."""
        fields = {"status": QUEUED, "runner": None, "lease_until": None, "eta_s": None}
        if self.db.update(job_id, owner=self.runner_id, **fields):
            self.db.event(job_id, "requeued", {"reason": reason})
        self._stop.wait(1.0)

    def _train_claimed(self, job_id: str) -> None:
        row = self.db.row(job_id)
        job = public(row)
        try:
            resume = self.files.load_state(row)
            training_data, validation_data = self.files.read_data(row)
        except Unavailable as e:
            self._release(job_id, f"{e.message}; the job waits in the queue")
            return
        except StateError as e:
            self._finish(job_id, FAILED, error=f"cannot resume: {e}")
            return
        except StoreError as e:  # the job's data is damaged or missing
            self._finish(job_id, FAILED, error=str(e))
            return
        if resume is None:
            self.db.event(job_id, "started", {})
        else:
            self.db.update(job_id, owner=self.runner_id, resumed_from=resume.step)
            self.db.event(job_id, "resumed", {"step": resume.step})
        try:
            spec = JobSpec(
                adapter_id=job["adapter_id"],
                method=job["method"],
                training_data=training_data,
                config=job["config"],
                target_modules=job["target_modules"],
                hyperparameters=job["hyperparameters"],
                validation_data=validation_data,
            )
            hp, train, val = self.validate(spec)

            first_step = resume.step if resume is not None else 0

            def on_step(info: dict) -> None:
                step, total = info["step"], info["total_steps"]
                if step % self.step_event_every == 0 or step == total:
                    per_step = info["elapsed_s"] / max(step - first_step, 1)
                    self.db.update(
                        job_id,
                        owner=self.runner_id,
                        step=step,
                        total_steps=total,
                        loss=info["loss"],
                        epoch=info["epoch"],
                        tokens_per_s=info["tokens_per_s"],
                        eta_s=per_step * (total - step),
                    )
                    self.db.event(job_id, "step", info)
                self._yield_to_serving()

            def on_eval(entry: dict) -> None:
                self.db.update(job_id, owner=self.runner_id, val_loss=entry["loss"])
                self.db.event(job_id, "eval", entry)

            def on_checkpoint(step: int, adapter: Adapter) -> None:
                record = self._put(f"{spec.adapter_id}@{step}", adapter)
                self.db.event(job_id, "checkpoint", {"step": step, "adapter_id": record.adapter_id})

            adapter, history = train_adapter(
                self.base,
                spec.method,
                dict(spec.config or {}),
                spec.target_modules,
                train,
                val,
                hp,
                on_step=on_step,
                on_eval=on_eval,
                should_stop=lambda: job_id in self._cancel or job_id in self._lost or self._stop.is_set(),
                on_checkpoint=on_checkpoint,
                resume=resume,
                on_state=lambda state: self.files.save_state(job_id, self.runner_id, state),
                state_every_s=self.state_every_s,
            )
            if job_id in self._lost:  # another runner took the job over: it is theirs now
                return
            if job_id in self._cancel:
                self._finish(job_id, CANCELLED)
                return
            if history.stopped:  # the server is shutting down: resume on the next start
                fields = {"status": QUEUED, "runner": None, "lease_until": None, "eta_s": None}
                if not self.db.update(job_id, owner=self.runner_id, step=history.last_step, **fields):
                    return
                self.db.event(
                    job_id,
                    "paused",
                    {"step": history.last_step, "reason": "the server is shutting down; resumes on restart"},
                )
                return
            if self._publish_conflict(job_id, spec.adapter_id, adapter, history.last_step):
                return
            record = self._put(spec.adapter_id, adapter)
            result = {
                "adapter_id": record.adapter_id,
                "version": record.version,
                "steps": history.last_step,
                "resumed_from": history.resumed_from,
                "trainable_params": history.trainable_params,
                "train_loss": history.final_loss,
                "val_loss_before": history.val[0]["loss"] if history.val else None,
                "val_loss_after": history.val[-1]["loss"] if history.val else None,
                "wall_s": history.wall_s,
            }
            steps = {"step": history.last_step, "total_steps": history.total_steps}
            self.db.update(job_id, owner=self.runner_id, **steps)
            self._finish(job_id, SUCCEEDED, result=result)
        except (JobInvalid, TrainingError, StoreError, AdapterError, DataError, StateError) as e:
            self._finish(job_id, FAILED, error=str(e))
        except Exception as e:  # a bug or resource problem: record it, keep the worker alive
            self._finish(job_id, FAILED, error=f"internal error: {type(e).__name__}: {e}")
