"""What a mixed prefill costs above the base model's, with the kernels on torch's threads or not.

8 requests of 256 fresh prompt tokens each (the default model, in-process, one step of 2,048
tokens; every prompt new, so the prefix cache never hits) over ``--mix`` (the mixes of
``server/kernels/microbench.py``: ``lora8``, ``per_family``, ``ten_configs``), a request per 4th
adapter of the mix. Median time of the whole prefill of each scenario, interleaved round by round:

  base      no adapter
  threads   the fused kernels, rows split over torch's threads (the default)
  thread1   the same kernels on the calling thread (``set_kernel_threads_(False)``: how they ran
            before the module was built with OpenMP, 2026-12-03)
  torch     the families' torch code

    .venv/bin/python bench/prefill_mix.py [--mix per_family] [--threads 2] [--rounds 4] [--out NAME.json]

Writes bench/results/prefill-<mix>.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.requests import SamplingParams  # noqa: E402
from server.kernels.microbench import MIXES, add_mix, bench_engine, interleaved  # noqa: E402

PROMPTS, PROMPT_TOKENS = 8, 256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", choices=MIXES, default="per_family")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None, help="file name under bench/results/ (prefill-<mix>.json)")
    args = ap.parse_args()
    engine, k = bench_engine(args.threads)
    ids = add_mix(engine, args.mix)
    adapters = [ids[4 * i % len(ids)] for i in range(PROMPTS)]
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    fresh = itertools.count()

    def prefill_ms(adapter_ids, kernels, threads: bool) -> float:
        """One prefill of PROMPTS new prompts (none seen before), run dry; wall time in ms."""
        engine.planner.kernels = kernels
        k.set_kernel_threads_(threads)
        c = next(fresh)
        for i, a in enumerate(adapter_ids):
            prompt = [100 + (13 * i + 7 * c + j * (c + 3)) % 5000 for j in range(PROMPT_TOKENS)]
            engine.submit(prompt, params, a)
        t = time.perf_counter()
        while engine.generator.num_running or engine.generator.num_waiting:
            engine.generator.step()
        return (time.perf_counter() - t) * 1e3

    scenarios = {
        "base": ([None] * PROMPTS, k, True),
        "threads": (adapters, k, True),
        "thread1": (adapters, k, False),
        "torch": (adapters, None, True),
    }
    try:
        runs, med = interleaved(scenarios, prefill_ms, args.rounds, digits=0)
    finally:
        engine.planner.kernels = k
        k.set_kernel_threads_(True)
    result = {
        "dtype": str(engine.base.dtype).removeprefix("torch."),
        "threads": args.threads,
        "mix": args.mix,
        "prompts": PROMPTS,
        "prompt_tokens": PROMPT_TOKENS,
        "prefill_ms_median": med,
        "prefill_ms_rounds": runs,
        "base_over_scenario": {n: med["base"] / v for n, v in med.items()},
    }
    print(f"{'scenario':>8} {'prefill ms':>10} {'base/it':>8}")
    for n, v in med.items():
        print(f"{n:>8} {v:10.0f} {med['base'] / v:8.3f}")
    out = Path(__file__).parent / "results" / (args.out or f"prefill-{args.mix}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
