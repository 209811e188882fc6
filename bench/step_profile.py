"""Where one decode step's time goes, at batch 1 and batch 32 (SmolLM2, in-process), and what the
HTTP layer adds per streamed token.

Phases are timed with perf_counter by wrapping, from outside, the functions that do them (the
engine's code is not changed for this):

  forward     the model's forward (every layer, the adapters' work included)
  planning    StepPlanner.plan (which adapter rows go where)
  sampling    sample_rows + row_top_logprobs (the host sync of the sampled ids follows them)
  detok       IncrementalDetokenizer.push / flush
  stop        StopStringBuffer.add
  events      GenerationRequest.emit (TokenEvent / FinishEvent into the request's sink)
  metrics     the Prometheus step observer (Metrics.on_step)
  other       the rest of Generator.step: KV-cache bookkeeping, masks, position ids, the
              ``.tolist()`` of the sampled tokens, Python per-row loops

HTTP: one greedy stream through ``python -m server`` (SSE over loopback) against the same request
on an in-process engine thread (BlockingStream), interleaved for ``--rounds`` rounds; the
difference of the inter-token latency p50 is the HTTP layer's cost per streamed token.

    .venv/bin/python bench/step_profile.py [--dtype float32] [--threads 2] [--steps 24] [--rounds 3]
        [--no-http] [--ops]

Writes bench/results/step-profile-<dtype>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import batching as generator_module  # noqa: E402  (sample_rows lives there)
from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import dtype_name, load_base_model  # noqa: E402
from server.engine.requests import (  # noqa: E402
    GenerationRequest,
    IncrementalDetokenizer,
    SamplingParams,
    StopStringBuffer,
    TokenEvent,
)
from server.metrics import Metrics  # noqa: E402
from server.settings import Settings  # noqa: E402

PHASES = ["forward", "planning", "sampling", "detok", "stop", "events", "metrics", "other"]
CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


class Timers:
    """Per-phase seconds accumulated while ``on`` (decode steps only)."""

    def __init__(self):
        self.on = False
        self.acc: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[phase] += time.perf_counter() - t0

        return timed


def instrument(engine: Engine, timers: Timers) -> None:
    """Wrap each phase's function (instance attributes or module/class attributes)."""
    model = engine.base.model
    model.forward = timers.wrap("forward", model.forward)
    engine.planner.plan = timers.wrap("planning", engine.planner.plan)
    generator_module.sample_rows = timers.wrap("sampling", generator_module.sample_rows)
    generator_module.row_top_logprobs = timers.wrap("sampling", generator_module.row_top_logprobs)
    IncrementalDetokenizer.push = timers.wrap("detok", IncrementalDetokenizer.push)
    IncrementalDetokenizer.flush = timers.wrap("detok", IncrementalDetokenizer.flush)
    StopStringBuffer.add = timers.wrap("stop", StopStringBuffer.add)
    GenerationRequest.emit = timers.wrap("events", GenerationRequest.emit)
    metrics = Metrics(top_adapters=0)  # the step observer: histograms, no scrape
    engine.generator.observers.append(timers.wrap("metrics", metrics.on_step))


def profile_decode(engine: Engine, timers: Timers, prompts, steps: int) -> dict:
    """Per-step ms of each phase, median over ``steps`` decode steps of one batch."""
    params = SamplingParams(max_new_tokens=steps + 2, temperature=0, ignore_eos=True, stop=["\n\n\n"])
    reqs = [engine.submit(p, params, None) for p in prompts]
    engine.generator.step()  # the prefill
    per_step: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        timers.acc.clear()
        timers.on = True
        t0 = time.perf_counter()
        engine.generator.step()
        total = time.perf_counter() - t0
        timers.on = False
        for r in reqs:
            r.sink.drain()
        for phase in PHASES[:-1]:
            per_step[phase].append(timers.acc.get(phase, 0.0) * 1000)
        per_step["other"].append((total - sum(timers.acc.values())) * 1000)
        per_step["total"].append(total * 1000)
    while engine.generator.num_running:
        engine.generator.step()
    for r in reqs:
        r.sink.drain()
    return {k: statistics.median(v) for k, v in per_step.items()}


def top_ops(engine: Engine, prompts, steps: int, n: int = 12) -> list[dict]:
    """torch.profiler over ``steps`` decode steps of one batch: the ops taking most CPU time."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_new_tokens=steps + 2, temperature=0, ignore_eos=True)
    reqs = [engine.submit(p, params, None) for p in prompts]
    engine.generator.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.generator.step()
    while engine.generator.num_running:
        engine.generator.step()
    for r in reqs:
        r.sink.drain()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "calls_per_step": e.count / steps,
        }
        for e in rows
    ]


def itl_engine(engine: Engine, ids: list[int], n: int) -> list[float]:
    """Inter-token gaps (s) of one stream on the running engine thread, as its consumer sees them."""
    req = engine.submit(ids, SamplingParams(max_new_tokens=n, temperature=0))
    times = [time.perf_counter() for ev in req.sink if isinstance(ev, TokenEvent)]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def itl_http(url: str, body: dict) -> list[float]:
    """Inter-token gaps (s) of one SSE stream from ``/generate``, as the client receives them."""
    times = []
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"token_id"' in line:
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def http_cost(engine: Engine, args, results: dict) -> None:
    from load import launch  # bench/load.py: python -m server on a free port, fresh data dir

    tok = engine.base.tokenizer
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    n = args.http_tokens
    body = {"messages": CHAT, "max_new_tokens": n, "temperature": 0}
    flags = ["--dtype", args.dtype, "--threads", str(args.threads)]
    engine.start()
    rows: dict[str, list[float]] = {"engine_thread": [], "http_sse": []}
    with launch(False, None, flags) as server:
        itl_http(server.url, {**body, "max_new_tokens": 4})  # warm the connection path
        for _ in range(args.rounds):
            rows["engine_thread"].append(statistics.median(itl_engine(engine, ids, n)) * 1000)
            rows["http_sse"].append(statistics.median(itl_http(server.url, body)) * 1000)
    engine.stop()
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["http_cost_per_token_ms"] = out["http_sse"] - out["engine_thread"]
    results["itl_p50_ms"] = {**out, "runs": rows, "tokens": n}
    print(
        f"ITL p50: engine thread {out['engine_thread']:.1f} ms, HTTP SSE {out['http_sse']:.1f} ms "
        f"-> HTTP layer {out['http_cost_per_token_ms']:+.1f} ms/token",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--http-tokens", type=int, default=48)
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also the top ops of the step (torch.profiler)")
    ap.add_argument("--tag", default="", help="suffix of the result file (e.g. before / after)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(threads=args.threads, dtype=args.dtype, max_batch_size=64)
    engine = Engine(load_base_model(settings), settings)
    timers = Timers()
    instrument(engine, timers)
    vocab = engine.base.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, vocab - 100, (32,), generator=g).tolist() for _ in range(64)]
    gc.collect()
    gc.freeze()
    batches = [int(b) for b in args.batches.split(",")]
    for b in batches:  # warm-up
        profile_decode(engine, timers, prompts[:b], 2)
    results: dict = {"meta": {"dtype": dtype_name(engine.base.dtype), "threads": args.threads}, "decode": {}}
    for b in batches:
        rounds = [profile_decode(engine, timers, prompts[:b], args.steps) for _ in range(args.rounds)]
        row = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results["decode"][f"batch{b}"] = row
        parts = "  ".join(f"{k} {row[k]:.2f}" for k in PHASES)
        print(f"batch {b:<3d} step {row['total']:.1f} ms:  {parts}", flush=True)
    if args.ops:
        results["top_ops"] = {}
        for b in batches:
            ops = results["top_ops"][f"batch{b}"] = top_ops(engine, prompts[:b], args.steps)
            print(f"batch {b}: " + ", ".join(f"{o['op']} {o['self_ms_per_step']:.1f}" for o in ops[:8]))
    if not args.no_http:
        http_cost(engine, args, results)
    tag = f"-{args.tag}" if args.tag else ""
    out = Path(__file__).parent / "results" / f"step-profile-{results['meta']['dtype']}{tag}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
