"""What each family's native op costs inside a projection, with the caches cold as in a step.

The engine runs a few steps of 32 requests over ``--mix``; the groups it binds for ``--path``
(the last decode step's) are then built into ``Projection``s of their own: one without ops, one
per group, one with all of them (as served: lanes over the threads). Each round streams 64 MB
through the caches (a step's base GEMMs stream the weights between two visits to one projection)
and times ``run`` of every projection once; the figure is the median over rounds of each
projection's time less the op-free one's in the same round.

``--warm``: also time each op after a ``torch.empty`` (the allocator's and ATen's paths warm) and
after an FFT of another length through ``torch.fft`` (MKL's code warm): where the cold cost sits.

    .venv/bin/python bench/op_costs.py [--mix per_family] [--path layers.29.self_attn.q_proj]
        [--rounds 600] [--threads 2] [--warm]

Printed only (the figures are in docs/engine.md, *What one op costs inside a step*).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import adapted_linear  # noqa: E402
from server.engine.requests import SamplingParams  # noqa: E402
from server.kernels.fast import native_op  # noqa: E402
from server.kernels.microbench import MIXES, STEP_PROMPTS, add_mix, bench_engine  # noqa: E402

HOOKS = ("pre", "post", "delta")


def bound_groups(mix: str, path: str, threads: int):
    """``(kernels, base linear, groups, scope)`` the engine bound for ``path`` in its last step."""
    seen: dict[str, tuple] = {}
    plan = adapted_linear.ServeBinding._native_plan

    def spy(self, p, base, groups):
        seen[p] = (base, list(groups))
        return plan(self, p, base, groups)

    adapted_linear.ServeBinding._native_plan = spy
    try:
        engine, k = bench_engine(threads)
        params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
        for prompt, adapter in zip(STEP_PROMPTS, add_mix(engine, mix), strict=True):
            engine.submit(prompt, params, adapter)
        for _ in range(4):  # prefill, then decode steps
            engine.generator.step()
    finally:
        adapted_linear.ServeBinding._native_plan = plan
    full = next((p for p in seen if p.endswith(path)), None)
    if full is None:
        raise SystemExit(f"no bound projection ends with {path!r}")
    base, groups = seen[full]
    return k, base, groups, full.rpartition(".")[0], engine.base.dtype


def projection(k, base, groups, scope):
    spectra = k.Spectra()
    ops = {
        h: [native_op(k, g.method, g.sig, h, g, spectra, scope) for g in groups if h in g.hooks]
        for h in HOOKS
    }
    return k.Projection(base.weight, base.bias, ops["pre"], ops["post"], ops["delta"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", choices=MIXES, default="per_family")
    ap.add_argument("--path", default="layers.29.self_attn.q_proj")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", action="store_true")
    args = ap.parse_args()
    k, base, groups, scope, dtype = bound_groups(args.mix, args.path, args.threads)
    torch.set_grad_enabled(False)
    x = torch.randn(len(STEP_PROMPTS), base.in_features).to(dtype)
    name = {id(g): type(g.method).__name__.removesuffix("Method").lower() for g in groups}
    scenarios = {"none": (projection(k, base, [], scope), None)}
    for g in groups:
        scenarios[name[id(g)]] = (projection(k, base, [g], scope), None)
    scenarios["all"] = (projection(k, base, groups, scope), None)
    if args.warm:
        other = torch.randn(1, base.in_features + 24)

        def allocate():
            torch.empty(4096), torch.empty(20000)

        def fft():
            torch.fft.irfft(torch.fft.rfft(other))

        for g in groups:
            p = scenarios[name[id(g)]][0]
            scenarios[f"{name[id(g)]} (allocator warm)"] = (p, allocate)
            scenarios[f"{name[id(g)]} (MKL FFT warm)"] = (p, fft)
    flush = torch.ones(16 << 20)  # 64 MB, read (clean lines: as a GEMM's weights leave them)
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {n: [] for n in scenarios}
    for _ in range(args.rounds):
        for n, (p, before) in scenarios.items():
            flush.sum()
            if before is not None:
                before()
            t = time.perf_counter_ns()
            p.run(x)
            times[n].append((time.perf_counter_ns() - t) / 1e3)
    print(f"{args.mix}, {args.path}, {dtype}, {args.threads} threads, {args.rounds} rounds")
    print("groups:", ", ".join(f"{name[id(g)]} ({g.rows.numel()} rows)" for g in groups))
    print(f"{'projection':>26} {'us':>7} {'+us vs none':>12}  lanes (pre, out)  spread")
    for n, v in times.items():
        extra = statistics.median(a - b for a, b in zip(v, times["none"], strict=True))
        p = scenarios[n][0]
        print(f"{n:>26} {statistics.median(v):7.1f} {extra:12.1f}  {p.lanes!s:>16}  {p.spread}")


if __name__ == "__main__":
    main()
