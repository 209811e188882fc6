"""Scenarios against a running Facet cluster (``make serve-cluster``; docs/scale-out.md).

    .venv/bin/python bench/cluster.py --url http://127.0.0.1:8000 --adapters 32 --requests 128
    .venv/bin/python bench/cluster.py --scenario cold --start-store --start-cluster --adapters 16
    .venv/bin/python bench/cluster.py --scenario kill --start-store --start-cluster --adapters 32

Every scenario uploads ``--adapters`` random non-zero LoRA adapters (r=``--rank``, for the base
model the settings name; ``--tiny``: the tests' tiny model) through the API first.

* ``throughput`` (default): one warm-up request per adapter, then ``--requests`` greedy
  generations round-robin over the adapters with ``--concurrency`` in flight; reports affinity
  (the share of requests served by their adapter's most frequent replica, ``X-Facet-Replica``)
  and generated tokens per second over the measured phase (wall clock).
* ``cold``: the added time to first token of an adapter's first request on a replica, with the
  store on S3 (``bench/cluster_scenarios.py``).
* ``kill``: SIGKILL of one engine replica under sustained streaming load: requests lost without
  an error event, recovery, adapter data afterwards (``bench/cluster_scenarios.py``).

``--start-store`` starts an S3 server (moto) and PostgreSQL on free loopback ports in temporary
folders (tests/store/backend_servers.py), ``--start-cluster`` runs ``python -m server.cluster``
on them (its own Ray instance, data folder and log), and both are stopped by pid at the end, so
one command reproduces a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.*, bench.*: run from anywhere

from tests.api.processes import wait_ready  # noqa: E402
from tests.engine.helpers import random_adapter  # noqa: E402

TINY_FACTORY = "tests.cluster.tiny_factory:tiny_app_on_configured_store"
READY_TIMEOUT_S = 600.0


# ---- adapters ---------------------------------------------------------------------------------
def make_adapters(ids: list[str], args) -> dict[str, tuple[bytes, bytes]]:
    """Random non-zero LoRA files per id: (adapter_config.json, adapter_model.safetensors) bytes.
    Built before the cluster starts, so the base model loaded here does not compete with it."""
    if args.tiny:
        from server.engine.loader import wrap_model
        from tests.api.tiny_server import BASE_NAME, TARGETS
        from tests.conftest import make_tiny_llama, make_tokenizer

        base = wrap_model(BASE_NAME, make_tiny_llama(), make_tokenizer(), TARGETS)
    else:
        from server.engine.loader import load_base_model
        from server.settings import Settings

        base = load_base_model(Settings(models_dir=args.models_dir, threads=1, dtype="float32"))
    weights = {p: m.base.weight for p, m in base.modules.items()}
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed, adapter_id in enumerate(ids):
            config = {"r": args.rank, "lora_alpha": 2 * args.rank}
            adapter = random_adapter("lora", config, base.module_shapes, weights, seed=seed)
            folder = Path(tmp) / adapter_id
            adapter.save(folder)
            files[adapter_id] = (
                (folder / "adapter_config.json").read_bytes(),
                (folder / "adapter_model.safetensors").read_bytes(),
            )
    return files


async def upload_all(client: httpx.AsyncClient, files: dict[str, tuple[bytes, bytes]]) -> dict[str, dict]:
    """Upload every adapter; per id: its version and the replica that stored it."""
    stored = {}
    for adapter_id, (config, weights) in files.items():
        parts = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
        response = await client.post("/adapters", data={"adapter_id": adapter_id}, files=parts)
        if response.status_code not in (200, 201):
            raise SystemExit(f"upload of {adapter_id} failed: {response.status_code} {response.text}")
        stored[adapter_id] = {
            "version": response.json()["version"],
            "replica": response.headers.get("x-facet-replica"),
            "sha256": hashlib.sha256(weights).hexdigest(),
        }
    return stored


# ---- throughput -------------------------------------------------------------------------------
async def generate(client: httpx.AsyncClient, adapter_id: str, max_new_tokens: int) -> tuple[str, int]:
    body = {
        "prompt": "Write a sentence about rivers.",
        "adapter": adapter_id,
        "max_new_tokens": max_new_tokens,
    }
    response = await client.post("/generate", json={**body, "temperature": 0.0})
    response.raise_for_status()
    return response.headers["x-facet-replica"], response.json()["usage"]["completion_tokens"]


async def throughput(args, stack: Stack, files: dict) -> dict:
    ids = list(files)
    async with httpx.AsyncClient(base_url=stack.url, timeout=600) as client:
        await upload_all(client, files)
        for adapter_id in ids:  # warm-up: each adapter lands on a replica
            await generate(client, adapter_id, 1)
        await asyncio.sleep(1.0)
        served = {a: Counter() for a in ids}
        gate = asyncio.Semaphore(args.concurrency)
        tokens = 0

        async def one(adapter_id: str) -> None:
            nonlocal tokens
            async with gate:
                replica, n = await generate(client, adapter_id, args.max_new_tokens)
            served[adapter_id][replica] += 1
            tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(one(ids[i % len(ids)]) for i in range(args.requests)))
        elapsed = time.perf_counter() - start
    on_home = sum(c.most_common(1)[0][1] for c in served.values() if c)
    replicas = Counter(r for c in served.values() for r in c.elements())
    return {
        "requests": args.requests,
        "adapters": args.adapters,
        "concurrency": args.concurrency,
        "affinity": round(on_home / args.requests, 4),
        "requests_per_replica": dict(replicas),
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
    }


# ---- the stack: store servers and the cluster process -----------------------------------------
@dataclass
class Stack:
    """Where the cluster answers, and what this run started (pids to signal, the S3 bucket)."""

    url: str
    cluster_pid: int | None = None
    s3_endpoint: str | None = None
    s3_bucket: str | None = None
    store: str = "as the cluster was started"
    log: Path | None = None
    known_pids: set[int] = field(default_factory=set)

    def descendants(self) -> set[int]:
        """Every live process under the cluster's driver (Ray's GCS, raylet, workers)."""
        if self.cluster_pid is None:
            return set()
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = set(), [self.cluster_pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        self.known_pids |= found
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_env(endpoint: str, bucket: str, dsn: str) -> dict[str, str]:
    from tests.store.backend_servers import S3_ENV

    return {
        **S3_ENV,
        "FACET_STORE_BLOB_URL": f"s3://{bucket}/facet",
        "FACET_STORE_S3_ENDPOINT": endpoint,
        "FACET_STORE_INDEX_URL": dsn,
    }


@contextlib.contextmanager
def cluster_process(args, env: dict[str, str]) -> Iterator[tuple[str, int, Path]]:
    """``python -m server.cluster`` on a free port with its own data folder and Ray temp folder;
    stopped with SIGINT (Serve and Ray shut down), then anything of it still alive by pid."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="fcb-", dir="/tmp"))  # short: Ray's socket paths
    log = work / "cluster.log"
    cmd = [sys.executable, "-m", "server.cluster", "--replicas", str(args.replicas), "--port", str(port)]
    cmd += ["--data-dir", str(work / "data"), "--threads", "1", "--dtype", "float32"]
    cmd += ["--models-dir", str(args.models_dir or REPO / "var" / "models")]
    cmd += ["--factory", TINY_FACTORY] if args.tiny else []
    cmd += ["--max-batch-size", str(args.max_batch_size)] if args.max_batch_size else []
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(work)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    stack = Stack(f"http://127.0.0.1:{port}", cluster_pid=proc.pid)
    try:
        wait_ready(stack.url, READY_TIMEOUT_S, alive=lambda: proc.poll() is None, log=log)
        yield stack.url, proc.pid, log
    finally:
        stack.descendants()
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in stack.known_pids:  # Ray's own processes normally exit with the driver
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def cluster_stack(args) -> Iterator[Stack]:
    """The cluster (and its store) this run measures: started here, or ``--url``."""
    with contextlib.ExitStack() as stack:
        env, endpoint, bucket, store = {}, None, None, "as the cluster was started"
        if args.start_store:
            from tests.store.backend_servers import S3_ENV, moto_server, new_bucket, postgres_server

            os.environ.update(S3_ENV)  # boto3 here (the bucket, the S3 timings) and in moto
            endpoint = stack.enter_context(moto_server())
            dsn = stack.enter_context(postgres_server())
            bucket = new_bucket(endpoint)
            env = store_env(endpoint, bucket, dsn)
            store = "S3 (moto_server, loopback) + PostgreSQL (loopback)"
        elif args.start_cluster:
            store = "embedded (SQLite + local files, one data_dir shared by the replicas)"
        if not args.start_cluster:
            yield Stack(args.url, s3_endpoint=endpoint, s3_bucket=bucket, store=store)
            return
        url, pid, log = stack.enter_context(cluster_process(args, env))
        yield Stack(url, cluster_pid=pid, s3_endpoint=endpoint, s3_bucket=bucket, store=store, log=log)


# ---- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=["throughput", "cold", "kill"], default="throughput")
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="a running cluster (no --start-cluster)"
    )
    parser.add_argument("--start-store", action="store_true", help="start moto (S3) + PostgreSQL on loopback")
    parser.add_argument("--start-cluster", action="store_true", help="run python -m server.cluster here")
    parser.add_argument("--replicas", type=int, default=2, help="with --start-cluster")
    parser.add_argument("--max-batch-size", type=int, default=None, help="with --start-cluster")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model (smoke runs)")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the uploaded adapters")
    parser.add_argument("--requests", type=int, default=128, help="throughput: measured requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warm-requests", type=int, default=3, help="cold: warm requests per adapter")
    parser.add_argument("--duration", type=float, default=60.0, help="kill: seconds of load")
    parser.add_argument("--kill-after", type=float, default=15.0, help="kill: seconds of load before it")
    parser.add_argument("--after-duration", type=float, default=20.0, help="kill: load after recovery")
    parser.add_argument(
        "--recovery-timeout", type=float, default=300.0, help="kill: wait for the replacement"
    )
    parser.add_argument("--victim-pid", type=int, default=None, help="kill: the replica process (else found)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="base model cache (default <data_dir>/models)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.start_cluster and args.models_dir is None and not args.tiny:
        args.models_dir = REPO / "var" / "models"
    files = make_adapters([f"bench-{i}" for i in range(args.adapters)], args)
    if args.scenario == "throughput":
        run = throughput
    else:
        from bench import cluster_scenarios

        run = cluster_scenarios.cold if args.scenario == "cold" else cluster_scenarios.kill
    with cluster_stack(args) as stack:
        report = asyncio.run(run(args, stack, files))
    report = {"scenario": args.scenario, "command": " ".join(sys.argv), "store": stack.store, **report}
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
