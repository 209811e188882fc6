"""Each fine-tune job's data and resume state, in the adapter store's blob store.

So that any replica sharing the store can run (or resume) any job, nothing a job needs stays in
one replica's folder. Objects, each written once with a conditional create and recorded (sha256,
size) in the job's row only after it is written (``adapters_store.objects``)::

    jobs/<job id>/train.jsonl                         the data as submitted   (train_sha256, train_bytes)
    jobs/<job id>/val.jsonl                           the validation data     (val_sha256, val_bytes)
    jobs/<job id>/state-<step>-<hex>.safetensors      the latest resume state (state_key, state_sha256, ...)

A resume state is a new object per save (keys are immutable): the row is pointed at it with a
write fenced on the runner that holds the job, then the previous state is removed; a runner that
lost its job removes what it just wrote instead. Reads are checked against the row's sha256 (a
remote store reads through the replica's bounded cache). Rows of jobs submitted before this
layout have no sha256: their data and state are read from ``<jobs root>/<job id>/`` as before.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from adapters_store.errors import StoreError, Unavailable
from adapters_store.objects import ObjectStore, collect_orphans

from .jobdb import JobDB
from .state import StateError, TrainState, load_state, load_state_bytes, state_bytes

PREFIX = "jobs/"
LEGACY_STATE = "resume.safetensors"


def _key(job_id: str, name: str) -> str:
    return f"{PREFIX}{job_id}/{name}"


def _owner(key: str) -> str | None:
    job_id = key[len(PREFIX) :].split("/", 1)[0]
    return job_id if job_id.startswith("ft-") else None


class JobFiles:
    def __init__(self, objects: ObjectStore, db: JobDB, legacy_root: Path):
        self.objects = objects
        self.db = db
        self.legacy_root = Path(legacy_root)

    # ---- data --------------------------------------------------------------------------------
    def write_data(self, job_id: str, train: str, val: str | None) -> dict:
        """Store the job's data; the row columns that point at it (insert them after this)."""
        fields = {}
        for name, text in (("train", train), ("val", val)):
            if text is None:
                continue
            data = text.encode("utf-8")
            fields[f"{name}_sha256"] = self.objects.put(_key(job_id, f"{name}.jsonl"), data)
            fields[f"{name}_bytes"] = len(data)
        return fields

    def discard_data(self, job_id: str) -> None:
        """A job whose row was never inserted: remove what ``write_data`` wrote."""
        self.objects.delete_prefix(_key(job_id, ""))

    def read_data(self, row: dict) -> tuple[str, str | None]:
        """``(training data, validation data or None)``, checked against the row."""
        out = []
        for name in ("train", "val"):
            if row.get(f"{name}_sha256") is not None:
                key = _key(row["id"], f"{name}.jsonl")
                data = self.objects.get(key, row[f"{name}_sha256"], row[f"{name}_bytes"], f"{name}.jsonl")
                out.append(data.decode("utf-8"))
            else:  # a job submitted before the store held job data
                path = self.legacy_root / row["id"] / f"{name}.jsonl"
                out.append(path.read_text(encoding="utf-8") if path.exists() else None)
        if out[0] is None:
            raise StoreError("training_data", "the job's training data is missing")
        return out[0], out[1]

    # ---- resume state ------------------------------------------------------------------------
    def has_state(self, row: dict) -> bool:
        return row.get("state_key") is not None or (self.legacy_root / row["id"] / LEGACY_STATE).exists()

    def load_state(self, row: dict) -> TrainState | None:
        """The job's latest resume state, None if it has none; ``StateError`` if it is damaged,
        ``Unavailable`` if the blob store does not answer (retry later)."""
        if row.get("state_key") is None:
            legacy = self.legacy_root / row["id"] / LEGACY_STATE
            return load_state(legacy) if legacy.exists() else None
        try:
            data = self.objects.get(row["state_key"], row["state_sha256"], row["state_bytes"], "state")
        except Unavailable:
            raise  # the store is away: nothing is known to be wrong with the state
        except StoreError as e:
            raise StateError(f"the resume state is unreadable ({e.message})") from None
        return load_state_bytes(data)

    def save_state(self, job_id: str, runner: str, state: TrainState) -> bool:
        """Store ``state`` as the job's latest, if ``runner`` still holds the job; False if not."""
        previous = self.db.row(job_id).get("state_key")
        data = state_bytes(state)
        key = _key(job_id, f"state-{state.step:08d}-{uuid.uuid4().hex[:8]}.safetensors")
        sha = self.objects.put(key, data)
        pointer = {"state_key": key, "state_sha256": sha, "state_bytes": len(data), "state_step": state.step}
        held = self.db.update(job_id, owner=runner, **pointer)
        if not held:  # another runner took the job: what we wrote is nobody's
            self.objects.delete(key)
        elif previous is not None:
            self.objects.delete(previous)
        return held

    def drop_state(self, row: dict) -> None:
        """Remove the job's resume state (it finished); the row keeps no pointer to it."""
        if row.get("state_key") is not None:
            self.db.update(row["id"], state_key=None, state_sha256=None, state_bytes=None, state_step=None)
            self.objects.delete(row["state_key"])
        (self.legacy_root / row["id"] / LEGACY_STATE).unlink(missing_ok=True)

    # ---- garbage -----------------------------------------------------------------------------
    def gc(self, grace_s: float) -> int:
        """Remove job objects that no row needs: a submit that failed between its data and its
        row, and resume states no row points to (older than ``grace_s``)."""
        rows: dict[str, dict] = {}

        def live(ids: set[str]) -> set[str]:
            rows.update({r["id"]: r for r in self.db.pointers() if r["id"] in ids})
            return set(rows)

        removed = collect_orphans(self.objects, PREFIX, _owner, live, grace_s)
        for job_id, row in rows.items():  # states a crash left next to the current one
            for info in self.objects.blobs.list(_key(job_id, "state-")):
                old = time.time() - info.mtime >= grace_s
                if info.key != row.get("state_key") and row["status"] != "running" and old:
                    self.objects.delete(info.key)
                    removed += 1
        return removed
