"""Where a mixed decode step's adapter time goes: every fused-kernel call timed in place.

32 requests (the default model, in-process) over ``--mix`` (as ``bench/dispatch.py``: ``lora8``,
``per_family``, ``ten_configs``). The engine's kernel module is wrapped so each call's time is
added to its kernel's total (``perf_counter`` around the call, decode steps of 32 rows only);
each round runs a no-adapter batch, then the mix, and prints per kernel: ms per decode step,
calls per step and µs per call.

    .venv/bin/python bench/kernel_profile.py [--mix per_family] [--rounds 2] [--threads 2] [--slow]

``--slow``: the kernels' fast paths off (``set_fast_paths_(False)``), for a before/after.
``--thread1``: each round also runs the mix with every kernel on the calling thread
(``set_kernel_threads_(False)``), then prints both, kernel by kernel.
Printed only (the per-call figures are in docs/engine.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.requests import SamplingParams  # noqa: E402
from server.kernels.microbench import (  # noqa: E402
    MIXES,
    STEP_PROMPTS,
    STEP_ROWS,
    add_mix,
    bench_engine,
    median_decode_step_ms,
)


class TimedKernels:
    """The kernel module, each call's time added to ``totals[name]`` on 32-row (decode) steps.
    It hides the module's ``Projection`` (one native call per projection), so the engine calls
    each kernel from Python (``_fused_plan``) where it can be timed."""

    def __init__(self, k):
        self.k = k
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def __getattr__(self, name):
        if name == "Projection":
            raise AttributeError(name)
        f = getattr(self.k, name)
        if not callable(f):
            return f

        def timed(*args):
            t = time.perf_counter()
            out = f(*args)
            if args[0].shape[0] == STEP_ROWS:
                self.totals[name] += time.perf_counter() - t
                self.calls[name] += 1
            return out

        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", choices=MIXES, default="per_family")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--slow", action="store_true", help="the kernels' fast paths off")
    ap.add_argument("--thread1", action="store_true", help="also run with every kernel on one thread")
    args = ap.parse_args()
    engine, k = bench_engine(args.threads)
    k.set_fast_paths_(not args.slow)
    timed = TimedKernels(k)
    engine.planner.kernels = timed
    ids = add_mix(engine, args.mix)
    prompts = STEP_PROMPTS
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    steps = args.new_tokens - 1  # decode steps of 32 rows (the first step prefills)
    print(f"{args.mix}, fast paths {k.fast_paths if not args.slow else 'off'}, {args.threads} threads")
    for adapters in ([None] * STEP_ROWS, ids):  # warm-up: slots installed, first calls made
        median_decode_step_ms(engine, prompts, adapters, params)
    splits = (True, False) if args.thread1 else (True,)
    for r in range(args.rounds):
        base = median_decode_step_ms(engine, prompts, [None] * STEP_ROWS, params)
        for split in splits:
            k.set_kernel_threads_(split)
            timed.totals.clear()
            timed.calls.clear()
            mixed = median_decode_step_ms(engine, prompts, ids, params)
            total = sum(timed.totals.values()) * 1e3 / steps
            label = "" if len(splits) == 1 else (" (kernel threads)" if split else " (one thread)")
            print(
                f"round {r + 1}{label}: base {base:.1f} ms, mix {mixed:.1f} ms ({base / mixed:.3f}), "
                f"kernels {total:.1f} ms"
            )
            for name in sorted(timed.totals, key=lambda n: -timed.totals[n]):
                t, n = timed.totals[name], timed.calls[name]
                per_step, per_call = t * 1e3 / steps, t / n * 1e6
                print(
                    f"  {name:20s} {per_step:6.2f} ms/step {n // steps:5d} calls/step {per_call:7.1f} us/call"
                )
    k.set_fast_paths_(True)
    k.set_kernel_threads_(True)


if __name__ == "__main__":
    main()
