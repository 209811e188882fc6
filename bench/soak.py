"""Soak over real HTTP: many requests over many adapters; server memory, fds and threads stay flat.

    .venv/bin/python bench/soak.py                     # tiny server: 10,000 requests, 200 adapters
    .venv/bin/python bench/soak.py --model             # python -m server on SmolLM2-135M (slow on CPU)
    .venv/bin/python bench/soak.py --requests 500 --adapters 20 --warmup 100   # a short one

Uploads ``--adapters`` adapters with random non-zero weights, every family in turn (LoRA, HUT,
ETHER+, DCT, SURM), then sends ``--requests`` requests from ``--concurrency`` closed-loop clients:
a seeded random adapter each (1 in 20 on the base model), mixed routes (``/generate``, its SSE
stream, ``/v1/completions``). Device and host adapter budgets are small by default, so adapters
are evicted and reloaded all the time. The server's RSS, open fds and threads, and the number of
``/metrics`` series, are taken after ``--warmup`` requests, when the last requests start, and at
the end (after the gauges are back to 0). Passes when there are no errors, RSS grew less than
``--max-growth`` (5 %) from warm-up to the end, and fds, threads and series stayed flat.

Prints a table, writes ``bench/results/soak.json`` (``--out``), exits 1 when a check fails.
``tests/reliability/test_soak.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import RESULTS, Server, client_for, gauges_idle, launch, process_stats, scrape  # noqa: E402
from tests.api.conftest import FAMILY_CONFIGS, adapter_files  # noqa: E402

FAMILIES = list(FAMILY_CONFIGS)  # lora, hut, ether, dct, surm
WORDS = "the sea is calm and blue today while a small boat drifts near old stone harbour walls".split()


def base_for_adapters(model: str | None):
    """The base model whose shapes (and weights, for some inits) the adapters are built for."""
    if model is None:
        from server.engine.loader import wrap_model
        from tests.api.tiny_server import TARGETS
        from tests.conftest import make_tiny_llama, make_tokenizer

        return wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)
    from server.engine.loader import load_base_model
    from server.settings import Settings

    return load_base_model(Settings(model=model, models_dir=REPO / "var" / "models", threads=1))


def upload_adapters(url: str, base, n: int, folder: Path, prefix: str = "soak") -> list[str]:
    """``n`` adapters ``<prefix>-<i>`` with random non-zero weights, families in turn."""
    ids = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            family = FAMILIES[i % len(FAMILIES)]
            config, weights = adapter_files(base, family, folder / str(i), seed=1000 + i)
            files = {
                "config": ("adapter_config.json", config),
                "weights": ("adapter_model.safetensors", weights),
            }
            adapter_id = f"{prefix}-{i}"
            r = client.post("/adapters", data={"adapter_id": adapter_id}, files=files)
            r.raise_for_status()
            ids.append(adapter_id)
    return ids


def series_count(url: str) -> int:
    """Number of samples ``/metrics`` exposes (label cardinality must stay bounded)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


@dataclass
class Tally:
    done: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # first few non-200 answers, for the report
    checkpoints: dict[str, dict] = field(default_factory=dict)


async def _request(
    client: httpx.AsyncClient, i: int, adapter: str | None, base_name: str, prompt: str, n: int
) -> tuple[int, str]:
    kind = i % 4
    if kind == 1:  # OpenAI-compatible
        body = {"model": adapter or base_name, "prompt": prompt, "max_tokens": n, "temperature": 0}
        r = await client.post("/v1/completions", json=body)
        return r.status_code, r.text
    body = {"prompt": prompt, "adapter": adapter, "max_new_tokens": n}
    if kind == 0:  # SSE stream: read to the end; a mid-stream failure is an ``error`` event
        async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
            text = (await r.aread()).decode()
        if r.status_code == 200 and ("event: done" not in text or "event: error" in text):
            return 599, text  # a stream that failed after its 200 header
        return r.status_code, text
    r = await client.post("/generate", json=body)
    return r.status_code, r.text


async def drive(
    server: Server,
    adapters: list[str],
    base_name: str,
    requests: int,
    concurrency: int,
    warmup: int,
    new_tokens: int,
    prompts: list[str],
    seed: int = 0,
) -> Tally:
    """Closed-loop clients over a seeded request plan; stats are taken after ``warmup`` requests
    and when the last ``concurrency`` requests start (``late``)."""
    rng = random.Random(seed)
    pick = [(None if rng.random() < 0.05 else rng.choice(adapters)) for _ in range(requests)]
    plan = [(adapter, rng.choice(prompts)) for adapter in pick]
    tally = Tally()
    next_index = iter(range(requests))
    async with client_for(server.url) as client:

        async def worker() -> None:
            for i in next_index:
                adapter, prompt = plan[i]
                status, text = await _request(client, i, adapter, base_name, prompt, new_tokens)
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                if status != 200 and len(tally.errors) < 10:
                    tally.errors.append(f"{status}: {text[:300]}")
                tally.done += 1
                for name, at in (("warmup", warmup), ("late", requests - concurrency)):
                    if tally.done == at:  # both while every client is busy: comparable
                        stats = await asyncio.to_thread(process_stats, server.pid)
                        stats["metrics_series"] = await asyncio.to_thread(series_count, server.url)
                        tally.checkpoints[name] = {"requests": at, **stats}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def run_soak(server: Server, base, a: argparse.Namespace, work: Path) -> dict:
    t0 = time.perf_counter()
    adapters = upload_adapters(server.url, base, a.adapters, work)
    upload_s = time.perf_counter() - t0
    base_name = httpx.get(server.url + "/ready").json()["model"]
    vocab = [f"t{i}" for i in range(1, 128)] if a.model is None else WORDS
    rng = random.Random(1)
    prompts = [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(32)]
    # Scrape once first: /metrics counts its own route, which would otherwise be a new series later.
    start = {**process_stats(server.pid), "metrics_series": series_count(server.url)}
    t1 = time.perf_counter()
    tally = asyncio.run(
        drive(server, adapters, base_name, a.requests, a.concurrency, a.warmup, a.new_tokens, prompts)
    )
    seconds = time.perf_counter() - t1
    gauges = gauges_idle(server.url)
    time.sleep(1.0)  # housekeeping runs while idle
    end = {"requests": a.requests, **process_stats(server.pid), "metrics_series": series_count(server.url)}
    m = scrape(server.url)
    churn = {  # adapters moved between tiers during the run (small budgets: many)
        "loads_from_disk": m["facet_adapter_loads_total"],
        "device_installs": m["facet_adapter_device_installs_total"],
        "device_evictions": m['facet_adapter_evictions_total{tier="device"}'],
        "host_evictions": m['facet_adapter_evictions_total{tier="host"}'],
    }
    warm, late = tally.checkpoints["warmup"], tally.checkpoints["late"]
    growth = (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"] * 100
    checks = {
        "no_errors": sum(n for s, n in tally.statuses.items() if s != 200) == 0,
        "rss_growth_ok": growth < a.max_growth,
        # Worker pools (anyio's, asyncio's) grow and shrink by a few threads with the traffic;
        # a leak grows with the number of requests (thousands between the two points).
        "fds_flat": late["fds"] <= warm["fds"] + 4 and end["fds"] <= warm["fds"],
        "threads_flat": late["threads"] <= warm["threads"] + 8,
        "series_flat": end["metrics_series"] <= warm["metrics_series"],
        "gauges_idle": not any(gauges.values()),
    }
    return {
        "adapters": a.adapters,
        "requests": a.requests,
        "concurrency": a.concurrency,
        "new_tokens": a.new_tokens,
        "upload_seconds": round(upload_s, 1),
        "run_seconds": round(seconds, 1),
        "requests_per_s": round(a.requests / seconds, 1),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "errors": tally.errors,
        "start": {"requests": 0, **start},
        "warmup": warm,
        "late": late,
        "end": end,
        "rss_growth_pct": round(growth, 2),
        "churn": churn,
        "gauges_after": gauges,
        "checks": checks,
        "passed": all(checks.values()),
    }


def print_table(r: dict) -> None:
    print(
        f"  {r['requests']} requests over {r['adapters']} adapters, concurrency {r['concurrency']}: "
        f"{r['run_seconds']} s ({r['requests_per_s']} req/s); statuses {r['statuses']}"
    )
    print(f"  {'point':<8} {'requests':>8} {'RSS MiB':>9} {'fds':>5} {'threads':>7} {'series':>7}")
    for name in ("start", "warmup", "late", "end"):
        p = r[name]
        series = p.get("metrics_series", "")
        cells = f"{p['requests']:>8} {p['rss_mb']:>9.1f} {p['fds']:>5} {p['threads']:>7} {series:>7}"
        print(f"  {name:<8} {cells}")
    print("  churn: " + ", ".join(f"{k} {int(v)}" for k, v in r["churn"].items()))
    print(
        f"  RSS growth after warm-up: {r['rss_growth_pct']:+.2f} %   checks: "
        + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in r["checks"].items())
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        nargs="?",
        const="smollm2-135m-instruct",
        default=None,
        help="python -m server on this model (default SmolLM2) instead of the tiny server",
    )
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1000, help="requests before the baseline is taken")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 16 (tiny) or 8")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--device-adapter-bytes", type=int, default=None, help="default: room for ~1/4 of them")
    ap.add_argument("--host-adapter-bytes", type=int, default=None, help="default: room for ~1/2 of them")
    ap.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, %%")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    return ap


def main() -> None:
    a = parser().parse_args()
    result = soak(a)
    print_table(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    sys.exit(0 if result["passed"] else 1)


def soak(a: argparse.Namespace) -> dict:
    """Build the adapters' base, start the server with small adapter budgets, run, stop."""
    a.new_tokens = a.new_tokens or (16 if a.model is None else 8)
    base = base_for_adapters(a.model)
    per_adapter = 10_000 if a.model is None else 4 << 20  # rough in-memory size of one adapter
    device = a.device_adapter_bytes or max(1, a.adapters // 4) * per_adapter
    host = a.host_adapter_bytes or max(1, a.adapters // 2) * per_adapter
    args = ["--max-batch-size", str(a.max_batch_size), "--device-adapter-bytes", str(device)]
    args += ["--host-adapter-bytes", str(host)]
    if a.model is not None:
        args += ["--threads", "1"]  # see bench/load.py --threads
    with (
        tempfile.TemporaryDirectory(prefix="facet-soak-") as tmp,
        launch(a.model is None, a.model, args) as server,
    ):
        result = run_soak(server, base, a, Path(tmp))
    result["meta"] = {
        "server": a.model or "tiny",
        "device_adapter_bytes": device,
        "host_adapter_bytes": host,
        "max_batch_size": a.max_batch_size,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    return result


if __name__ == "__main__":
    main()
