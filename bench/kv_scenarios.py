"""Two scenarios of issue 14 on the padded and the paged engine, side by side in one run.

* ``long``: ``--streams`` greedy streams decode while a ``--long-prompt``-token prompt (4,000) is
  admitted. Reported: the running streams' inter-token latency p50 and p99 over the window from
  the long prompt's arrival to its first token, and that prompt's TTFT. The padded engine prefills
  it in one piece (the streams wait for all of it); the paged one in chunks of the step budget.
* ``cached``: TTFT of a request whose ``--system-tokens``-token system prompt (1,000) is in the
  prefix cache (the same adapter version computed it just before) against one whose system prompt
  is new; median of ``--trials`` pairs.

``--engines`` takes ``bench/workload.py``'s names (``paged-floor200``: the paged engine with
``prefill_itl_floor_ms`` 200), so pacing settings are compared in one run.

    .venv/bin/python bench/kv_scenarios.py [--threads 2] [--step-tokens 256] [--engines padded,paged]

Writes bench/results/kv-scenarios.json (``--out``: another name there).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import ALL_TYPES, make_adapter  # noqa: E402
from bench.workload import engine_kind, pct  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import load_base_model  # noqa: E402
from server.engine.requests import SamplingParams, TokenEvent  # noqa: E402
from server.settings import Settings  # noqa: E402


def build(args, kind: str) -> Engine:
    cache, pacing = engine_kind(kind)
    overrides = {"threads": args.threads, "dtype": args.dtype, "kv_cache": cache, "max_batch_size": 32}
    if cache == "paged":
        overrides |= {"max_tokens_per_step": args.step_tokens, "kv_cache_bytes": args.kv_cache_bytes}
        overrides |= pacing
    settings = Settings(**overrides)
    engine = Engine(load_base_model(settings), settings)
    family, raw = ALL_TYPES[0]
    engine.add_adapter("a", make_adapter(engine, family, raw, seed=5))
    return engine


def long_prompt(engine: Engine, args, rng: random.Random) -> dict:
    gen = engine.generator
    vocab = engine.base.model.config.vocab_size
    params = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    streams = [
        engine.submit([rng.randrange(100, vocab) for _ in range(32)], params, "a")
        for _ in range(args.streams)
    ]
    times: list[list[float]] = [[] for _ in streams]
    for _ in range(8):  # all streams decoding
        gen.step()
        for t, r in zip(times, streams, strict=True):
            t.extend(time.perf_counter() for e in r.sink.drain() if isinstance(e, TokenEvent))
    prompt = [rng.randrange(100, vocab) for _ in range(args.long_prompt)]
    t0 = time.perf_counter()
    long = engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0), "a")
    window = [len(t) for t in times]
    first = None
    while first is None:
        gen.step()
        now = time.perf_counter()
        for t, r in zip(times, streams, strict=True):
            t.extend(now for e in r.sink.drain() if isinstance(e, TokenEvent))
        if any(isinstance(e, TokenEvent) for e in long.sink.drain()):
            first = now
    for _ in range(4):  # a few steps after, so the last gap of each stream closes
        gen.step()
        now = time.perf_counter()
        for t, r in zip(times, streams, strict=True):
            t.extend(now for e in r.sink.drain() if isinstance(e, TokenEvent))
    for r in streams:
        r.cancel()
    while gen.num_running or gen.num_waiting:
        gen.step()
    steady = [b - a for t, w in zip(times, window, strict=True) for a, b in zip(t[1:w], t[2:w], strict=False)]
    during = [
        b - a for t, w in zip(times, window, strict=True) for a, b in zip(t[w - 1 :], t[w:], strict=False)
    ]
    return {
        "streams": args.streams,
        "long_prompt_tokens": args.long_prompt,
        "steady_itl_p50_s": pct(steady, 0.5),
        "itl_p50_s": pct(during, 0.5),
        "itl_p99_s": pct(during, 0.99),
        "itl_max_s": max(during),
        "p99_over_p50": pct(during, 0.99) / pct(during, 0.5),
        "p99_over_steady_p50": pct(during, 0.99) / pct(steady, 0.5),
        "long_ttft_s": first - t0,
    }


def ttft(engine: Engine, prompt: list[int]) -> float:
    gen = engine.generator
    t0 = time.perf_counter()
    req = engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0), "a")
    while gen.num_running or gen.num_waiting:
        gen.step()
    assert any(isinstance(e, TokenEvent) for e in req.sink.drain())
    return time.perf_counter() - t0


def cached_ttft(engine: Engine, args, rng: random.Random) -> dict:
    vocab = engine.base.model.config.vocab_size
    cold, warm = [], []
    for _ in range(args.trials):
        system = [rng.randrange(100, vocab) for _ in range(args.system_tokens)]
        cold.append(
            ttft(engine, system + [rng.randrange(100, vocab) for _ in range(16)])
        )  # new system prompt
        warm.append(ttft(engine, system + [rng.randrange(100, vocab) for _ in range(16)]))  # cached
    c, w = statistics.median(cold), statistics.median(warm)
    return {"system_tokens": args.system_tokens, "uncached_ttft_s": c, "cached_ttft_s": w, "ratio": w / c}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=4000)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=256)
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--engines", default="padded,paged", help="as bench/workload.py's, comma-separated")
    ap.add_argument("--out", default="kv-scenarios.json", help="results file name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"meta": {"args": vars(args), "torch": torch.__version__, "machine": platform.machine()}}
    for kind in args.engines.split(","):
        engine = build(args, kind)
        rng = random.Random(0)
        ttft(engine, [1, 2, 3])  # warm-up: slots, kernels
        row = {"long": long_prompt(engine, args, rng), "cached": cached_ttft(engine, args, rng)}
        results[kind] = row
        lo, ca = row["long"], row["cached"]
        print(
            f"{kind:>14}: streams' ITL while a {args.long_prompt}-token prompt is admitted: "
            f"p50 {lo['itl_p50_s'] * 1e3:.0f} ms, p99 {lo['itl_p99_s'] * 1e3:.0f} ms "
            f"(p99/p50 {lo['p99_over_p50']:.2f}, p99/steady p50 {lo['p99_over_steady_p50']:.2f}); "
            f"its TTFT {lo['long_ttft_s']:.2f} s | {args.system_tokens}-token system prompt TTFT: "
            f"uncached {ca['uncached_ttft_s'] * 1e3:.0f} ms, cached {ca['cached_ttft_s'] * 1e3:.0f} ms "
            f"(ratio {ca['ratio']:.2f})",
            flush=True,
        )
        del engine
    out = Path(__file__).parent / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
