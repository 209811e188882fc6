"""Affinity and throughput of a running Facet cluster (``make serve-cluster``; docs/scale-out.md).

    .venv/bin/python bench/cluster.py --url http://127.0.0.1:8000 --adapters 32 --requests 128

Uploads ``--adapters`` random non-zero LoRA adapters (r=4, for the base model the settings name),
sends one warm-up request per adapter, then ``--requests`` greedy generations round-robin over
the adapters with ``--concurrency`` in flight, and reports:

* affinity: the share of requests served by their adapter's most frequent replica
  (``X-Facet-Replica``);
* throughput: generated tokens per second over the measured phase (wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.engine.helpers, run from anywhere

from server.engine.loader import load_base_model
from server.settings import Settings
from tests.engine.helpers import random_adapter


def adapter_files(base, folder: Path, seed: int) -> tuple[bytes, bytes]:
    weights = {p: m.base.weight for p, m in base.modules.items()}
    adapter = random_adapter("lora", {"r": 4, "lora_alpha": 8}, base.module_shapes, weights, seed=seed)
    adapter.save(folder)
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


async def upload_all(client: httpx.AsyncClient, ids: list[str], models_dir: Path | None) -> None:
    base = load_base_model(Settings(models_dir=models_dir, threads=1, dtype="float32"))
    with tempfile.TemporaryDirectory() as tmp:
        for seed, adapter_id in enumerate(ids):
            config, weights = adapter_files(base, Path(tmp) / adapter_id, seed)
            files = {
                "config": ("adapter_config.json", config),
                "weights": ("adapter_model.safetensors", weights),
            }
            response = await client.post("/adapters", data={"adapter_id": adapter_id}, files=files)
            if response.status_code not in (200, 201, 409):
                raise SystemExit(f"upload of {adapter_id} failed: {response.status_code} {response.text}")


async def generate(client: httpx.AsyncClient, adapter_id: str, max_new_tokens: int) -> tuple[str, int]:
    body = {
        "prompt": "Write a sentence about rivers.",
        "adapter": adapter_id,
        "max_new_tokens": max_new_tokens,
    }
    response = await client.post("/generate", json={**body, "temperature": 0.0})
    response.raise_for_status()
    return response.headers["x-facet-replica"], response.json()["usage"]["completion_tokens"]


async def measure(args) -> dict:
    ids = [f"bench-{i}" for i in range(args.adapters)]
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        await upload_all(client, ids, args.models_dir)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="base model cache (default <data_dir>/models)"
    )
    print(json.dumps(asyncio.run(measure(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
