"""What a mixed decode step costs above the base step, and how much of it is dispatch.

32 requests (the default model, in-process) over ``--mix``: ``lora8`` (8 LoRA r8 adapters on the 7
projections, 4 requests each; the default), ``per_family`` (32 adapters of the 5 families in their
default configs) or ``ten_configs`` (32 over the 10 configs), the mixes of
``server/kernels/microbench.py``. Median decode step of each scenario, the scenarios interleaved
round by round:

  base      no adapter
  lean      the kernels through ServeBinding's lean path: one native call per projection
            (``Projection``, server/kernels/plan_cpu.cpp) running the kernels around the base GEMM
  python    the same kernels called one by one from Python (``_fused_plan``)
  portable  the same with the kernels' fast paths off (``set_fast_paths_(False)``: the portable
            LoRA block instead of the AVX-512-BF16 one, torch's FFT instead of direct DFTI
            calls; only where the build has some)
  thread1   the lean path with every kernel on the calling thread (``set_kernel_threads_(False)``:
            how the kernels ran before they were built with OpenMP, 2026-12-03)
  generic   the kernels through batched_linear's general dispatch (the path before the lean one)
  noop      the python path with the kernel calls doing nothing (what is left is dispatch)
  torch     the families' torch code

    .venv/bin/python bench/dispatch.py [--mix lora8] [--threads 2] [--rounds 5] [--only base,lean,...]
                                       [--out NAME.json]

Writes bench/results/dispatch-<mix>.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import adapted_linear  # noqa: E402
from server.engine.requests import SamplingParams  # noqa: E402
from server.kernels.microbench import (  # noqa: E402
    MIXES,
    STEP_PROMPTS,
    add_mix,
    bench_engine,
    interleaved,
    median_decode_step_ms,
)

LEAN = adapted_linear.ServeBinding._run_for


def _generic(self, path, base):
    groups = self._groups_of(path)
    merged = [m for m in self.merged if path in m.weights]
    return lambda x: self._batched(path, x, base, groups, merged)


class _Kernels:
    """The kernels module without its native plans (each kernel called from Python), its in-place
    ops optionally doing nothing."""

    def __init__(self, k, noop: bool):
        self.k, self.noop = k, noop

    def __getattr__(self, name):
        if name == "Projection":
            raise AttributeError(name)
        if self.noop and name.endswith("_"):
            return lambda *args, **kwargs: None
        return getattr(self.k, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mix", choices=MIXES, default="lora8")
    ap.add_argument("--out", default=None, help="file name under bench/results/ (dispatch-<mix>.json)")
    ap.add_argument("--only", default=None, help="comma-separated scenarios to run (base is always run)")
    args = ap.parse_args()
    engine, k = bench_engine(args.threads)
    ids = add_mix(engine, args.mix)
    prompts = STEP_PROMPTS
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    scenarios = {
        "base": ([None] * 32, k, LEAN),
        "lean": (ids, k, LEAN),
        "python": (ids, _Kernels(k, False), LEAN),
        "generic": (ids, _Kernels(k, False), _generic),
        "noop": (ids, _Kernels(k, True), LEAN),
        "torch": (ids, None, LEAN),
    }
    if k.fast_paths:
        scenarios["portable"] = (ids, k, LEAN, False)
    scenarios["thread1"] = (ids, k, LEAN, True, False)
    if args.only:
        keep = {"base", *args.only.split(",")}
        unknown = keep - set(scenarios)
        if unknown:
            ap.error(f"unknown scenarios {sorted(unknown)}; known: {sorted(scenarios)}")
        scenarios = {n: s for n, s in scenarios.items() if n in keep}

    def step_ms(adapters, kernels, run_for, fast: bool = True, threads: bool = True) -> float:
        engine.planner.kernels = kernels
        adapted_linear.ServeBinding._run_for = run_for
        k.set_fast_paths_(fast)
        k.set_kernel_threads_(threads)
        return median_decode_step_ms(engine, prompts, adapters, params)

    try:
        runs, med = interleaved(scenarios, step_ms, args.rounds)
    finally:
        adapted_linear.ServeBinding._run_for = LEAN
        k.set_fast_paths_(True)
        k.set_kernel_threads_(True)
    result = {
        "dtype": str(engine.base.dtype).removeprefix("torch."),
        "threads": args.threads,
        "mix": args.mix,
        "fast_paths": list(k.fast_paths),
        "step_ms_median": med,
        "step_ms_rounds": runs,
        "base_step_over_scenario": {n: med["base"] / v for n, v in med.items()},
    }
    print(f"{'scenario':>8} {'step ms':>8} {'base/step':>9}")
    for n, v in med.items():
        print(f"{n:>8} {v:8.1f} {med['base'] / v:9.3f}")
    out = Path(__file__).parent / "results" / (args.out or f"dispatch-{args.mix}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
