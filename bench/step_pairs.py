"""Mixed decode steps against base steps, interleaved step by step (for a noisy machine).

``bench/dispatch.py`` interleaves its scenarios round by round, each round a few seconds of one
scenario; on a VM whose speed drifts within seconds (the base step's rounds read 78-137 ms in one
run, 2026-12-03) its ratios carry about ±0.1. Here two engines run side by side in one process: one
with 32 requests and no adapter, one with 32 requests over ``--mix``. Their decode steps alternate,
and the mix's steps cycle through the scenarios, so neighbouring steps see the same machine:

  base     the no-adapter engine's step
  lean     the mix, the kernels as served (one native call per projection, its groups spread
           over the threads: plan_cpu.cpp, ``Lanes``)
  thread1  the mix with every kernel and lane on the calling thread (``set_kernel_threads_(False)``)
  portable the mix with the kernels' fast paths off (``set_fast_paths_(False)``; only where the
           build has some)

Each scenario's median step, and the median of its step over the base step just before it (the
paired ratio, the figure to quote), are printed and written to JSON.

    .venv/bin/python bench/step_pairs.py [--mix per_family] [--steps 120] [--threads 2] [--out NAME.json]

Writes bench/results/step-pairs-<mix>.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.requests import SamplingParams  # noqa: E402
from server.kernels.microbench import MIXES, STEP_PROMPTS, add_mix, bench_engine  # noqa: E402


def timed_step(engine) -> float:
    t = time.perf_counter()
    engine.generator.step()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", choices=MIXES, default="per_family")
    ap.add_argument("--steps", type=int, default=120, help="decode steps of each engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="file name under bench/results/ (step-pairs-<mix>.json)")
    args = ap.parse_args()
    base, _ = bench_engine(args.threads)
    mixed, k = bench_engine(args.threads)
    ids = add_mix(mixed, args.mix)
    switches = {"lean": (True, True), "thread1": (True, False)}
    if k.fast_paths:
        switches["portable"] = (False, True)
    params = SamplingParams(max_new_tokens=args.steps + 8, temperature=0, ignore_eos=True)
    for p, a in zip(STEP_PROMPTS, ids, strict=True):
        base.submit(p, params, None)
        mixed.submit(p, params, a)
    for _ in range(4):  # the prefill steps and a warm-up decode step
        timed_step(base)
        timed_step(mixed)
    gc.freeze()  # as the server does once the model is loaded (server/app.py)
    steps: dict[str, list[float]] = {"base": [], **{s: [] for s in switches}}
    pairs: dict[str, list[float]] = {s: [] for s in switches}
    names = list(switches)
    try:
        for i in range(args.steps):
            name = names[i % len(names)]
            fast, threads = switches[name]
            b = timed_step(base)
            k.set_fast_paths_(fast)
            k.set_kernel_threads_(threads)
            m = timed_step(mixed)
            steps["base"].append(b)
            steps[name].append(m)
            pairs[name].append(b / m)
    finally:
        k.set_fast_paths_(True)
        k.set_kernel_threads_(True)
    result = {
        "mix": args.mix,
        "dtype": str(mixed.base.dtype).removeprefix("torch."),
        "threads": args.threads,
        "fast_paths": list(k.fast_paths),
        "step_ms_median": {s: statistics.median(v) for s, v in steps.items()},
        "base_over_scenario_paired_median": {s: statistics.median(v) for s, v in pairs.items()},
        "step_ms": steps,
    }
    print(f"{args.mix}, {result['dtype']}, {args.threads} threads, {args.steps} step pairs")
    print(f"{'scenario':>8} {'step ms':>8} {'base/step (paired)':>19}")
    for s, v in result["step_ms_median"].items():
        ratio = result["base_over_scenario_paired_median"].get(s, 1.0)
        print(f"{s:>8} {v:8.1f} {ratio:19.3f}")
    out = Path(__file__).parent / "results" / (args.out or f"step-pairs-{args.mix}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
