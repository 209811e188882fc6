"""kill -9 a real server (``python -m tests.api.tiny_server``) at random moments, restart it on the
same data dir, and check what it comes back with (checklist 4.C item 26, 4.E item 38).

After every restart:

* the server becomes ready;
* every listed adapter is whole: status ``ready``, its downloaded weights hash to the recorded
  sha256, its config is JSON, and it serves a generation at the listed version (once per
  version: later rounds re-hash it);
* uploads (test (a)): an id acknowledged (201) in the last round is present with the sha256 of
  its highest acknowledged version or of an upload still unanswered at the kill; an id whose
  uploads were all unanswered is whole or absent, never half-written; untouched ids unchanged;
* nothing is left under ``adapters/staging`` or ``uploads/``, and each adapter folder holds only
  its current version;
* fine-tunes (test (b)): no job stays ``running`` (its step stalls < 20 s; after the last
  restart every job ends ``succeeded``, resumed, or ``failed`` with a reason saying it was
  interrupted); checkpoints ``<id>@<step>`` that are listed are whole.

The RNG is seeded (``FACET_KILL9_SEED`` to replay); the seed is printed and named on failure.
``make test`` runs a few kill points; ``pytest -m slow`` runs 50+ (uploads) and 20 (jobs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from server.engine.loader import wrap_model
from tests.api.conftest import FAMILY_CONFIGS, adapter_files
from tests.api.processes import REPO, free_port, wait_ready
from tests.api.tiny_server import TARGETS
from tests.conftest import make_tiny_llama, make_tokenizer

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
TERMINAL = {"succeeded", "failed", "cancelled"}
STALL_S = 20  # a running job whose step does not move for this long is stuck
RECORDS = [{"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"} for i in range(8)]


def seed_from_env() -> int:
    seed = int(os.environ.get("FACET_KILL9_SEED", random.randrange(1 << 30)))
    print(f"kill -9 seed: {seed} (replay with FACET_KILL9_SEED={seed})")
    return seed


# ------------------------------------------------------------------------------- the server


class Server:
    """One tiny-server process on ``data_dir``; ``kill9`` ends it without any chance to clean up."""

    def __init__(self, data_dir: Path, log: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.api.tiny_server", *args], cwd=REPO, stdout=out, stderr=out
            )
        try:
            wait_ready(self.url, 120, alive=lambda: self.proc.poll() is None, log=log)
        except BaseException:
            self.kill9()
            raise

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# ------------------------------------------------------------------------------- checks


def check_adapters(
    client: httpx.Client, data_dir: Path, unchanged: dict | None = None, busy: frozenset = frozenset()
) -> dict[str, tuple[int, str]]:
    """Every listed adapter is whole and served; the disk holds nothing else. ``{id: (v, sha)}``.

    Adapters whose ``(version, sha256)`` is in ``unchanged`` (verified after an earlier restart)
    are re-hashed but not generated with again, which keeps long runs linear. ``busy``: adapter
    ids of fine-tunes still training, which may store ``<id>`` / ``<id>@<step>`` meanwhile: those
    are left out, and so is the staging check (a put may be under way)."""

    def settled(aid: str) -> bool:
        return aid.split("@")[0] not in busy

    listing = client.get("/adapters", params={"limit": 1000})
    assert listing.status_code == 200, listing.text
    records = [r for r in listing.json()["adapters"] if settled(r["adapter_id"])]
    for rec in records:
        aid = rec["adapter_id"]
        assert rec["status"] == "ready", rec
        weights = client.get(f"/adapters/{aid}/files/{WEIGHTS}")
        assert weights.status_code == 200, (aid, weights.text)
        assert hashlib.sha256(weights.content).hexdigest() == rec["sha256"], f"{aid}: weights differ"
        assert len(weights.content) == rec["nbytes"], aid
        json.loads(client.get(f"/adapters/{aid}/files/{CONFIG}").content)
        if (unchanged or {}).get(aid) == (rec["version"], rec["sha256"]):
            continue
        gen = client.post("/generate", json={"prompt": "t1 t2", "adapter": aid, "max_new_tokens": 2})
        assert gen.status_code == 200, (aid, gen.text)
        assert gen.json()["adapter_version"] == rec["version"], aid
    root = data_dir / "adapters"
    if not busy:
        assert list((root / "staging").iterdir()) == [], "staging not swept"
        assert list((data_dir / "uploads").glob("upload-*")) == [], "upload temp files left"
    on_disk = {p.name: sorted(v.name for v in p.iterdir()) for p in (root / "adapters").iterdir()}
    on_disk = {aid: versions for aid, versions in on_disk.items() if settled(aid)}
    assert on_disk == {r["adapter_id"]: [f"v{r['version']}"] for r in records}
    return {r["adapter_id"]: (r["version"], r["sha256"]) for r in records}


# ------------------------------------------------------------------------------- (a) uploads


def payloads(tmp: Path, n: int = 10) -> list[tuple[bytes, bytes, str]]:
    """``n`` different adapters for the tiny base: (config, weights, sha256 of the weights)."""
    base = wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)
    out = []
    for i in range(n):
        family = list(FAMILY_CONFIGS)[i % len(FAMILY_CONFIGS)]
        config, weights = adapter_files(base, family, tmp / f"p{i}", seed=i)
        out.append((config, weights, hashlib.sha256(weights).hexdigest()))
    return out


def multipart(adapter_id: str, config: bytes, weights: bytes) -> tuple[bytes, str]:
    b = "kill9-" + hashlib.sha256(weights + adapter_id.encode()).hexdigest()[:16]
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\n{adapter_id}\r\n'.encode()]
    for name, filename, data in (("config", CONFIG, config), ("weights", WEIGHTS, weights)):
        head = f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    parts.append(f"--{b}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={b}"


class Ledger:
    """What the client knows of one round of uploads: per id the highest acknowledged
    ``(version, sha256)`` and the sha256s of uploads that got no answer (in flight at the kill)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[int, str]] = {}
        self.pending: dict[int, tuple[str, str]] = {}
        self.unexpected: list[str] = []
        self.count = 0

    def upload(self, client: httpx.Client, aid: str, payload, rng: random.Random, slow: bool) -> None:
        config, weights, sha = payload
        body, ctype = multipart(aid, config, weights)
        with self.lock:
            self.count += 1
            ticket = self.count
            self.pending[ticket] = (aid, sha)
        content = body
        if slow:  # a body that trickles in: the kill may land while it is being written to disk

            def content():
                step = max(1, len(body) // 6)
                for i in range(0, len(body), step):
                    yield body[i : i + step]
                    time.sleep(rng.uniform(0.005, 0.03))

            content = content()
        try:
            r = client.post("/adapters", content=content, headers={"content-type": ctype})
        except httpx.TransportError:
            return  # the kill: stays pending
        with self.lock:
            del self.pending[ticket]
            if r.status_code != 201:
                self.unexpected.append(f"{aid}: {r.status_code} {r.text[:200]}")
            elif r.json()["sha256"] != sha:
                self.unexpected.append(f"{aid}: acknowledged with another sha256")
            elif r.json()["version"] > self.acked.get(aid, (0, ""))[0]:
                self.acked[aid] = (r.json()["version"], sha)

    def check(self, known: dict[str, tuple[int, str]], now: dict[str, tuple[int, str]]) -> None:
        """``known``: the verified state before this round; ``now``: after the restart."""
        assert self.unexpected == [], self.unexpected
        unanswered = defaultdict(set)
        for aid, sha in self.pending.values():
            unanswered[aid].add(sha)
        for aid in set(known) | set(self.acked) | set(unanswered) | set(now):
            allowed = set(unanswered[aid])
            if aid in self.acked:
                version, sha = self.acked[aid]
                allowed.add(sha)
                assert aid in now, f"{aid}: acknowledged upload lost"
                assert now[aid][0] >= version, f"{aid}: went back to v{now[aid][0]} < acknowledged v{version}"
            elif aid in known:
                allowed.add(known[aid][1])
                assert aid in now, f"{aid}: stored adapter lost"
            if not unanswered[aid] and aid not in self.acked:
                assert now.get(aid) == known.get(aid), f"{aid}: changed without an upload"
            if aid in now:
                assert now[aid][1] in allowed, f"{aid}: stored sha256 was never uploaded for it"


def uploader(url: str, ledger: Ledger, stop: threading.Event, prefix: str, pool, rng, slow: bool):
    """Uploads until ``stop``: new ids (15 %) and replacements of ``a0``..``a5``."""
    with httpx.Client(base_url=url, timeout=30) as client:
        n = 0
        while not stop.is_set():
            n += 1
            aid = f"{prefix}-{n}" if rng.random() < 0.15 else f"a{rng.randrange(6)}"
            ledger.upload(client, aid, rng.choice(pool), rng, slow)


def kill_during_uploads(server: Server, pool, round_no: int, rng: random.Random) -> Ledger:
    """Three concurrent uploaders (one with a trickling body), then kill -9 after a random delay."""
    ledger, stop = Ledger(), threading.Event()
    workers = [
        threading.Thread(
            target=uploader,
            args=(server.url, ledger, stop, f"new-{round_no}-{w}", pool, random.Random(rng.random()), w == 0),
        )
        for w in range(3)
    ]
    for t in workers:
        t.start()
    # The kill's moment is random, but after this round stored something: how soon the first
    # upload lands depends on the machine, and a round with nothing stored checks little.
    deadline = time.monotonic() + 60
    while not ledger.acked:
        assert time.monotonic() < deadline, f"no upload acknowledged within 60 s: {ledger.unexpected}"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.5))
    stop.set()
    server.kill9()
    for t in workers:
        t.join(60)
    return ledger


def upload_rounds(tmp_path: Path, kills: int) -> None:
    seed = seed_from_env()
    rng = random.Random(seed)
    pool = payloads(tmp_path / "payloads")
    data, log = tmp_path / "data", tmp_path / "server.log"
    known: dict[str, tuple[int, str]] = {}
    server = Server(data, log)
    try:
        for round_no in range(kills):
            ledger = kill_during_uploads(server, pool, round_no, rng)
            server = Server(data, log)
            try:
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    now = check_adapters(client, data, unchanged=known)
                ledger.check(known, now)
            except AssertionError as e:
                raise AssertionError(f"kill {round_no + 1}/{kills}: {e}") from e
            unanswered = len(ledger.pending)
            print(f"kill {round_no + 1}: {ledger.count} uploads ({unanswered} unanswered), {len(now)} stored")
            known = now
        assert known, "no upload was ever stored"
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}\n{log.read_text()[-3000:]}") from e
    finally:
        server.kill9()


def test_kill9_during_uploads(tmp_path):
    upload_rounds(tmp_path, kills=2)


@pytest.mark.slow
def test_kill9_during_uploads_many_points(tmp_path):
    upload_rounds(tmp_path, kills=50)


# ------------------------------------------------------------------------------- (b) fine-tunes


def job_body(adapter_id: str) -> dict:
    return {
        "adapter_id": adapter_id,
        "method": "lora",
        "method_config": {"r": 2},
        "hyperparameters": {"max_steps": 120, "batch_size": 2, "learning_rate": 0.01, "checkpoint_every": 30},
        "training_data": RECORDS,
    }


def check_jobs(client: httpx.Client, *, wait_s: float | None) -> list[dict]:
    """Statuses are legal and a failed job says it was interrupted; with ``wait_s``, every job
    also reaches a terminal status within it (none stays queued or running)."""
    deadline = time.monotonic() + (wait_s or 0)
    progress: dict[str, tuple[tuple, float]] = {}  # job id -> ((status, step), since when)
    while True:
        response = client.get("/fine-tunes", params={"limit": 1000})
        assert response.status_code == 200, response.text
        jobs = response.json()["jobs"]
        now = time.monotonic()
        for job in jobs:
            assert job["status"] in {"queued", "running", "succeeded", "failed"}, job
            if job["status"] == "failed":
                assert "interrupt" in (job["error"] or ""), f"{job['id']} failed: {job['error']}"
            state = (job["status"], job["step"])
            if progress.get(job["id"], (None,))[0] != state:
                progress[job["id"]] = (state, now)
            stalled = now - progress[job["id"]][1]
            assert job["status"] != "running" or stalled < STALL_S, f"stuck running at {state}: {job}"
        if wait_s is None or all(j["status"] in TERMINAL for j in jobs):
            break
        left = [(j["id"], j["status"], j["step"]) for j in jobs if j["status"] not in TERMINAL]
        assert now < deadline, f"jobs not finished {wait_s} s after the restart: {left}"
        time.sleep(0.2)
    for job in jobs:
        if job["status"] == "succeeded":
            info = client.get(f"/adapters/{job['adapter_id']}").json()
            assert info["version"] == job["result"]["version"], (job, info)
    return jobs


def past_first_checkpoint(client: httpx.Client, job_id: str) -> None:
    """Wait until the job has trained past its first checkpoint (its resumable state is saved at
    the checkpoint step, before the next step starts)."""
    every = job_body("x")["hyperparameters"]["checkpoint_every"]
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/fine-tunes/{job_id}").json()
        if job["step"] > every or job["status"] in TERMINAL:
            return
        assert time.monotonic() < deadline, f"no step past {every} within 120 s: {job}"
        time.sleep(0.05)


def job_rounds(tmp_path: Path, kills: int) -> None:
    seed = seed_from_env()
    rng = random.Random(seed)
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = Server(data, log)
    try:
        for round_no in range(kills):
            with httpx.Client(base_url=server.url, timeout=30) as client:
                # Sometimes let the previous (resumed) job finish first; otherwise the kill may
                # land while it resumes.
                if round_no and rng.random() < 0.5:
                    check_jobs(client, wait_s=120)
                response = client.post("/fine-tunes", json=job_body(f"job{round_no}"))
                assert response.status_code == 202, response.text
                if round_no == 0:  # this job has a checkpoint to resume from, however fast the machine
                    past_first_checkpoint(client, response.json()["id"])
            time.sleep(rng.uniform(0.05, 2.0))  # queued, training, checkpointing or done
            server.kill9()
            server = Server(data, log)
            last = round_no + 1 == kills
            with httpx.Client(base_url=server.url, timeout=30) as client:
                try:
                    jobs = check_jobs(client, wait_s=180 if last else None)
                    busy = frozenset(j["adapter_id"] for j in jobs if j["status"] not in TERMINAL)
                    stored = check_adapters(client, data, busy=busy)
                    print(
                        f"kill {round_no + 1}:",
                        [(j["status"], j["step"], j.get("resumed_from")) for j in jobs],
                    )
                except AssertionError as e:
                    raise AssertionError(f"kill {round_no + 1}/{kills}: {e}") from e
        statuses = {j["adapter_id"]: j["status"] for j in jobs}
        assert len(jobs) == kills and statuses["job0"] == "succeeded", statuses  # resumed, then done
        checkpoints = [a for a in stored if "@" in a]
        print(f"jobs: {statuses}; {len(checkpoints)} checkpoints verified whole")
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}\n{log.read_text()[-3000:]}") from e
    finally:
        server.kill9()


def test_kill9_during_fine_tunes(tmp_path):
    job_rounds(tmp_path, kills=2)


@pytest.mark.slow
def test_kill9_during_fine_tunes_many_points(tmp_path):
    job_rounds(tmp_path, kills=20)
