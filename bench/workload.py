"""Realistic load on the engine: Poisson arrivals, log-uniform lengths, adapters of every type.

Issue 14's workload, run in-process against the engine (no HTTP), so the figures are the engine's:

* prompts log-uniform in ``[--min-prompt, --max-prompt]`` tokens (16-2,000 by default), a share of
  them (``--system-share``) starting with one of ``--system-prompts`` shared system prompts (what a
  prefix cache can reuse); outputs log-uniform in ``[--min-output, --max-output]`` (16-512), EOS
  ignored so the lengths are the drawn ones;
* open-loop Poisson arrivals at each rate of ``--rates`` (requests/s), ``--requests`` per rate;
* ``--adapters`` adapters (32) cycling through one config of every registered type
  (``bench/serve.py``'s ``ALL_TYPES``), and base-model traffic (``--base-share``).

Reported per rate and engine: generated tokens/s, TTFT and inter-token latency p50/p99, KV bytes
in use against the bytes its real tokens need (``kv_ratio``: 1.0 is no waste; the left-padded batch
pays for the longest row, the paged cache for the last block of each sequence), and the prefix-hit
rate (full prompt blocks found in the paged cache's prefix cache).

``--engines paged,padded`` runs both engines (two copies of the model) on the same arrivals, rate
by rate, one after the other: the ratios of one run compare them under the same machine load.
``paged-share<K>``, ``paged-floor<MS>`` and ``paged-factor<F>`` (combinable:
``paged-share4-floor200``) are the paged engine with ``prefill_max_share`` K,
``prefill_itl_floor_ms`` MS or ``prefill_itl_factor`` F (``paged``: the defaults), so pacing
policies can be compared in one run too.

Capacity under a latency objective (Sarathi-Serve's measure): for each ITL p99 bound of
``--itl-bounds``, the best tokens/s an engine reached at a rate whose ITL p99 stayed within the
bound, and that against the padded engine's ("none": no rate met the bound).

    .venv/bin/python bench/workload.py [--rates 0.5,1,2,4] [--requests 24] [--threads 2] [--quick]

Writes bench/results/workload.json (workload-quick.json with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import ALL_TYPES, make_adapter  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import load_base_model  # noqa: E402
from server.engine.paged.generator import PagedGenerator  # noqa: E402
from server.engine.requests import FinishEvent, SamplingParams, TokenEvent  # noqa: E402
from server.settings import Settings  # noqa: E402


@dataclass
class Arrival:
    at: float  # seconds after the start
    prompt: list[int]
    new_tokens: int
    adapter: str | None


@dataclass
class Trace:
    arrival: Arrival
    submitted: float = 0.0
    tokens: list[float] = field(default_factory=list)  # time of each generated token
    error: str | None = None


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def make_arrivals(args, rate: float, vocab: int, adapters: list[str], seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    longest_system = max(201, args.max_prompt // 2)
    systems = [
        [rng.randrange(100, vocab - 100) for _ in range(log_uniform(rng, 200, longest_system))]
        for _ in range(args.system_prompts)
    ]
    out, t = [], 0.0
    for _ in range(args.requests):
        t += rng.expovariate(rate)
        n = log_uniform(rng, args.min_prompt, args.max_prompt)
        prompt = [rng.randrange(100, vocab - 100) for _ in range(n)]
        if systems and rng.random() < args.system_share:
            prompt = (rng.choice(systems) + prompt)[: max(n, args.max_prompt)]
        adapter = None if rng.random() < args.base_share else rng.choice(adapters)
        out.append(Arrival(t, prompt, log_uniform(rng, args.min_output, args.max_output), adapter))
    return out


def kv_bytes(engine: Engine) -> tuple[int, int]:
    """(bytes the running sequences' KV cache holds, bytes their real tokens need)."""
    gen = engine.generator
    if isinstance(gen, PagedGenerator):
        per_token = gen._bytes_per_token()
        real = sum(st.computed for st in gen._state.values())
        return gen.kv_bytes_in_use(), real * per_token
    batch = gen._running
    if batch.cache is None or not len(batch):
        return 0, 0
    layers = batch.cache.layers
    held = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    columns = batch.attention_mask.shape[1]
    real = int(batch.attention_mask.sum())
    return held, held * real // (len(batch) * columns)


def run_rate(engine: Engine, arrivals: list[Arrival]) -> dict:
    traces = [Trace(a) for a in arrivals]
    pending = list(traces)
    live: list[tuple[Trace, object]] = []
    ratios, held_peak = [], 0
    t0 = time.perf_counter()
    while pending or live:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival.at <= now:
            tr = pending.pop(0)
            a = tr.arrival
            params = SamplingParams(max_new_tokens=a.new_tokens, temperature=0, ignore_eos=True)
            tr.submitted = now
            live.append((tr, engine.submit(a.prompt, params, a.adapter)))
        if not live:  # idle until the next arrival
            time.sleep(max(0.0, pending[0].arrival.at - now))
            continue
        engine.generator.step()
        held, needed = kv_bytes(engine)
        if needed:
            ratios.append(held / needed)
            held_peak = max(held_peak, held)
        now = time.perf_counter() - t0
        still = []
        for tr, req in live:
            done = False
            for ev in req.sink.drain():
                if isinstance(ev, TokenEvent):
                    tr.tokens.append(now)
                elif isinstance(ev, FinishEvent):
                    done = True
                    tr.error = ev.error if ev.finish_reason == "error" else None
            if not done:
                still.append((tr, req))
        live = still
    elapsed = time.perf_counter() - t0
    return summarise(traces, elapsed, ratios, held_peak)


def prefix_counts(engine: Engine) -> tuple[int, int]:
    gen = engine.generator
    if not isinstance(gen, PagedGenerator):
        return 0, 0
    return gen.pool.stats.hit_blocks, gen.pool.stats.queried_blocks


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(traces: list[Trace], elapsed: float, ratios: list[float], held_peak: int) -> dict:
    ttft = [tr.tokens[0] - tr.arrival.at for tr in traces if tr.tokens]
    itl = [b - a for tr in traces for a, b in zip(tr.tokens, tr.tokens[1:], strict=False)]
    tokens = sum(len(tr.tokens) for tr in traces)
    return {
        "requests": len(traces),
        "errors": sum(tr.error is not None for tr in traces),
        "seconds": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99),
        "kv_ratio_mean": statistics.mean(ratios) if ratios else None,
        "kv_ratio_max": max(ratios) if ratios else None,
        "kv_bytes_peak": held_peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", default="0.25,0.5,1,2", help="requests per second, comma-separated")
    ap.add_argument("--requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--base-share", type=float, default=0.2)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=2000)
    ap.add_argument("--min-output", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--system-prompts", type=int, default=4)
    ap.add_argument("--system-share", type=float, default=0.5)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument(
        "--engines",
        default="padded,paged",
        help="padded, paged and/or paged-<options>, comma-separated",
    )
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="the paged cache's budget")
    ap.add_argument("--step-tokens", type=int, default=512, help="the paged engine's tokens per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short prompts and outputs, few requests")
    ap.add_argument("--out", default=None, help="results file name under bench/results/")
    ap.add_argument("--itl-bounds", default="0.25,0.5,1,2,4", help="ITL p99 bounds (s) for capacity")
    args = ap.parse_args()
    if args.quick:
        args.max_prompt, args.max_output, args.requests, args.rates = 256, 32, 8, "1,4"
    torch.set_num_threads(args.threads)
    kinds = args.engines.split(",")
    engines = {kind: build_engine(args, kind) for kind in kinds}
    engine = engines[kinds[0]]
    vocab = engine.base.model.config.vocab_size
    adapters = [f"w{i}" for i in range(args.adapters)]
    warm = make_arrivals(args, 100.0, vocab, adapters, seed=-1)[: len(ALL_TYPES)]
    for e in engines.values():
        run_rate(e, [Arrival(0.0, a.prompt[:32], 2, a.adapter) for a in warm])  # slots, kernels
    results = {
        "meta": {
            "model": engine.base.name,
            "dtype": str(engine.base.dtype).removeprefix("torch."),
            "device": str(engine.base.device),
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "args": vars(args),
            "engines": {
                "padded": "left-padded running batch (server/engine/kv_batch.py)",
                "paged": f"paged KV (server/engine/paged/), {args.step_tokens} tokens per step",
                "paged-share<K>-floor<MS>-factor<F>": "the paged engine with prefill_max_share K,"
                " prefill_itl_floor_ms MS, prefill_itl_factor F",
            },
        },
        "rates": {},
    }
    head = ("rate", "engine", "tok/s", "TTFT p50", "p99", "ITL p50", "p99", "KV ratio", "hits", "err")
    widths = (6, 22, 7, 9, 7, 8, 7, 9, 5, 4)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for k, rate in enumerate(float(r) for r in args.rates.split(",")):
        arrivals = make_arrivals(args, rate, vocab, adapters, seed=args.seed + k)
        for kind, e in engines.items():
            hits0, queried0 = prefix_counts(e)
            row = run_rate(e, arrivals)
            hits, queried = prefix_counts(e)
            row["prefix_hit_rate"] = (hits - hits0) / (queried - queried0) if queried > queried0 else 0.0
            results["rates"].setdefault(str(rate), {})[kind] = row
            print(
                f"{rate:6.2f} {kind:>22} {row['tokens_per_s']:7.1f} {ms(row['ttft_p50_s'])}ms "
                f"{ms(row['ttft_p99_s'])} {ms(row['itl_p50_s'])}ms {ms(row['itl_p99_s'])} "
                f"{row['kv_ratio_mean'] or 0:9.2f} {row['prefix_hit_rate']:5.2f} {row['errors']:4d}",
                flush=True,
            )
    bounds = [float(b) for b in args.itl_bounds.split(",")]
    results["capacity"] = capacity(results["rates"], kinds, bounds)
    print_capacity(results["capacity"], kinds)
    name = args.out or ("workload-quick.json" if args.quick else "workload.json")
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def capacity(rates: dict, kinds: list[str], bounds: list[float]) -> dict:
    """Per ITL p99 bound and engine: the best tokens/s over the rates that met the bound (None if
    none did; a rate with no inter-token gap measured meets none), and its ratio to the padded
    engine's."""
    out: dict = {}
    for bound in bounds:
        best = {}
        for kind in kinds:
            met = [
                r[kind]["tokens_per_s"]
                for r in rates.values()
                if r[kind]["itl_p99_s"] is not None and r[kind]["itl_p99_s"] <= bound
            ]
            best[kind] = max(met) if met else None
        ref = best.get("padded")
        out[str(bound)] = {
            kind: {"tokens_per_s": v, "vs_padded": v / ref if v is not None and ref else None}
            for kind, v in best.items()
        }
    return out


def print_capacity(cap: dict, kinds: list[str]) -> None:
    print("\ncapacity: best tokens/s at a rate whose ITL p99 met the bound (x padded)")
    print(f"{'bound':>7} " + " ".join(f"{k:>22}" for k in kinds))
    for bound, row in cap.items():
        cells = []
        for kind in kinds:
            v, x = row[kind]["tokens_per_s"], row[kind]["vs_padded"]
            cells.append(f"{'none' if v is None else f'{v:.1f}':>14} ({'-' if x is None else f'{x:.2f}x'})")
        print(f"{float(bound):6.2f}s " + " ".join(f"{c:>22}" for c in cells))


def ms(v):
    return f"{v * 1000:7.0f}" if v is not None else "      -"


PACING_OPTIONS = {
    "share": ("prefill_max_share", int),
    "floor": ("prefill_itl_floor_ms", float),
    "factor": ("prefill_itl_factor", float),
}


def engine_kind(kind: str) -> tuple[str, dict]:
    """``padded`` / ``paged`` / ``paged-share4-floor200``...: the cache and the pacing settings."""
    cache, *options = kind.split("-")
    if cache not in ("padded", "paged") or (options and cache != "paged"):
        raise SystemExit(f"unknown engine {kind!r}")
    overrides = {}
    for opt in options:
        key = next((k for k in PACING_OPTIONS if opt.startswith(k)), None)
        if key is None:
            raise SystemExit(f"unknown engine option {opt!r} in {kind!r}")
        setting, cast = PACING_OPTIONS[key]
        overrides[setting] = cast(opt[len(key) :])
    return cache, overrides


def build_engine(args, kind: str) -> Engine:
    """An engine of ``kind`` on its own copy of the model, with the bench's adapters registered."""
    cache, pacing = engine_kind(kind)
    overrides = {
        "threads": args.threads,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "kv_cache": cache,
        "kv_cache_bytes": args.kv_cache_bytes,
    }
    if cache == "paged":
        overrides |= {"max_tokens_per_step": args.step_tokens, **pacing}
    if args.model:
        overrides["model"] = args.model
    settings = Settings(**overrides)
    engine = Engine(load_base_model(settings), settings)
    if cache == "paged" and not isinstance(engine.generator, PagedGenerator):
        raise SystemExit("the paged cache is off for this model (see the log)")
    for i in range(args.adapters):
        family, raw = ALL_TYPES[i % len(ALL_TYPES)]
        engine.add_adapter(f"w{i}", make_adapter(engine, family, raw, seed=700 + i))
    return engine


if __name__ == "__main__":
    main()
