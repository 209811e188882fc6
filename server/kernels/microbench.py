"""``python -m server.kernels.microbench``: what one pool's adapter work costs per projection.

For each family config of ``bench/serve.py``'s per-family mix and each SmolLM2-135M projection
shape, one group of slot-pool rows goes through ``batched_linear`` in a 32-row step: with the
families' torch code, with the fused kernels, and (bf16 only) with the float32 kernels on rows
upcast to float32 and float32 copies of the tables, the result cast back (the "upcast" candidate
for bf16, kept here because it was measured against the bf16 kernels). Printed: microseconds
above the bare base GEMM (best of many short runs; a loaded machine inflates every column alike).

``--engine``: whole decode steps of the default model (32 requests, 32-token prompts), no adapter
and three mixes (the 5 families, the 10 configs, 8 LoRA r8 over 32 requests), each mix with the
kernels and with the torch code, interleaved round by round; the median step times and
``base step / scenario step`` (the tokens/s ratio vs no adapter).

``--prefill``: each of the 10 configs at prefill size (256 of 512 rows over 8 slots, bf16), the
torch code against the kernels, summed over the projection shapes.

``--lora``: 8 LoRA r8 slots on all 32 rows instead of the mix (issue 13's PEFT LoRA scenario),
and a masked "segmented GEMM pair" in torch (``x Aᵀ`` for every slot's factors at once, masked to
each row's slot, then ``· Bt``) for comparison with the kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from server import kernels
from server.kernels.fast import SharedSpectra, fast_op
from server.methods import Group, batched_linear, get_method, stack_prepared
from server.settings import Settings

MIX = [
    ("lora", {"r": 8, "lora_alpha": 16}),
    ("hut", {"r": 1}),
    ("ether", {"variant": "etherplus", "side": "auto", "n_blocks": 4}),
    ("dct", {"n_frequency": 700}),
    ("surm", {"variant": "circulant"}),
    ("surm", {"variant": "kronecker", "kron_factor": 32}),
]
SHAPES = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536)}
STEP_ROWS = 32


def make_group(family, raw, shape, dtype, n_rows, n_slots, seed=0, step_rows=STEP_ROWS):
    """A group of ``n_rows`` of the step's ``step_rows`` rows over ``n_slots`` random adapters
    (tables in ``dtype``)."""
    out_f, in_f = shape
    method = get_method(family)
    cfg = method.parse_config({"peft_type": method.peft_type, "target_modules": ["m"], **raw})
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    prepared = []
    for _ in range(n_slots):
        out = method.prepare(cfg, method.init_params(cfg, w, "random", g), w)
        prepared.append(
            {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in out.items()}
        )
    rows = torch.randperm(step_rows, generator=g)[:n_rows].sort().values
    slots = torch.randint(0, n_slots, (n_rows,), generator=g)
    sig = method.signature(cfg, out_f, in_f)
    return Group(method, sig, stack_prepared(prepared), rows, slots), w.to(dtype)


def best_us(f, reps=10, trials=60) -> float:
    for _ in range(reps):
        f()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def with_kernels(k, g: Group, upcast: bool = False) -> Group:
    out = Group(g.method, g.sig, g.table, g.rows, g.slots)
    t32 = {n: (t.float() if t.is_floating_point() else t) for n, t in g.table.items()}
    for hook in out.hooks:
        f = fast_op(k, g.method, g.sig, hook, SharedSpectra(), rows=g.rows.numel())
        if f is None:
            continue
        if upcast:  # float32 kernels on upcast rows and tables, result cast back
            g32 = Group(g.method, g.sig, t32, g.rows, g.slots)

            def f(target, x, _g, f32=f, g32=g32):
                t = target.float()
                f32(t, t if x is target else x.float(), g32)
                target.copy_(t)

        out.fused[hook] = f
    return out


def lora_segmented(x, y, g: Group):
    """x·Aᵀ over every slot's factors, masked to the row's slot, then ·Bt: one GEMM pair."""
    a, bt = g.table["A"], g.table["Bt"]
    n_slots, r, in_f = a.shape
    a_cat, bt_cat = a.reshape(n_slots * r, in_f), bt.reshape(n_slots * r, -1)
    mask = (torch.arange(n_slots).repeat_interleave(r)[None] == g.slots[:, None]).to(x.dtype)

    def run():
        h = (x.index_select(0, g.rows) @ a_cat.T) * mask
        y.index_add_(0, g.rows, h @ bt_cat)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", action="store_true", help="8 LoRA r8 slots on all 32 rows")
    ap.add_argument("--engine", action="store_true", help="whole decode steps, kernels on vs off")
    ap.add_argument("--prefill", action="store_true", help="each config at prefill size, torch vs kernels")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="--engine: write the results here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine:
        res = engine_ab(args.threads, args.rounds, args.new_tokens, args.dtype)
        print(json.dumps(res["base_step_over_scenario"], indent=1))
        if args.out:
            args.out.write_text(json.dumps(res, indent=2))
        return
    k = kernels.load(Settings().kernels_build_dir)
    if k is None:
        raise SystemExit("the kernels cannot be built here")
    if args.prefill:
        prefill_table(k)
        return
    configs = MIX[:1] if args.lora else MIX
    n_rows, n_slots = (STEP_ROWS, 8) if args.lora else (6, 6)
    print(f"{n_rows} of {STEP_ROWS} rows, {n_slots} slots, {args.threads} thread(s): us above the base GEMM")
    for family, raw in configs:
        for name, shape in SHAPES.items():
            cols = {}
            for dtype in (torch.float32, torch.bfloat16):
                g, w = make_group(family, raw, shape, dtype, n_rows, n_slots)
                x = torch.randn(STEP_ROWS, shape[1]).to(dtype)
                d = "fp32" if dtype == torch.float32 else "bf16"
                with torch.inference_mode():
                    base = best_us(lambda w=w, x=x: F.linear(x, w))
                    cols[f"{d} base GEMM"] = base
                    runs = {"torch": g, "kernels": with_kernels(k, g)}
                    if dtype == torch.bfloat16:
                        runs["upcast"] = with_kernels(k, g, upcast=True)
                    for what, grp in runs.items():
                        step = lambda x=x, w=w, grp=grp: batched_linear(x, w, None, [grp])  # noqa: E731
                        cols[f"{d} {what}"] = best_us(step) - base
                    if args.lora:
                        y = F.linear(x, w)
                        cols[f"{d} seg-GEMM"] = best_us(lora_segmented(x, y, g))
            label = f"{family}:{raw.get('variant', '')}"[:16]
            print(f"{label:16s} {name:5s} " + "  ".join(f"{c} {v:6.1f}" for c, v in cols.items()), flush=True)


def prefill_table(k, step_rows: int = 512) -> None:
    """``--prefill``: each of the 10 configs on half of a ``step_rows``-row bf16 step over 8 slots,
    summed over the 4 projection shapes: µs above the base GEMMs, torch code and kernels."""
    print(
        f"{step_rows // 2} of {step_rows} rows, 8 slots, {torch.get_num_threads()} thread(s), bf16: "
        "us above the base GEMMs, 4 shapes summed"
    )
    for family, raw in TEN_CONFIGS:
        total = {"torch": 0.0, "kernels": 0.0}
        for shape in SHAPES.values():
            g, w = make_group(family, raw, shape, torch.bfloat16, step_rows // 2, 8, step_rows=step_rows)
            x = torch.randn(step_rows, shape[1]).bfloat16()
            with torch.inference_mode():
                base = best_us(lambda w=w, x=x: F.linear(x, w), reps=3, trials=10)
                for what, grp in {"torch": g, "kernels": with_kernels(k, g)}.items():
                    run = lambda x=x, w=w, grp=grp: batched_linear(x, w, None, [grp])  # noqa: E731
                    total[what] += best_us(run, reps=3, trials=10) - base
        label = f"{family} {raw}"[:64]
        print(f"{label:64s} " + "  ".join(f"{n} {v:7.0f}" for n, v in total.items()), flush=True)


# ---- --engine: whole decode steps, kernels on and off in one process --------------------------------
# The serving mixes (bench/serve.py imports them: one definition for both benchmarks). TEN_CONFIGS:
# every config variant served on the fly; HUT rank > 1 is served merged by policy, so it is left out
# (the merged scenario reports it). PER_FAMILY: the 5 families in their default configs.
PER_FAMILY = [MIX[0], MIX[1], MIX[2], ("dct", {"n_frequency": 700}), ("surm", {"variant": "circulant"})]
TEN_CONFIGS = [
    ("lora", {"r": 8, "lora_alpha": 16}),
    ("hut", {"r": 1}),
    ("hut", {"r": 1, "use_scale_shift": True}),
    ("ether", {"variant": "ether", "side": "auto", "n_blocks": 4}),
    ("ether", {"variant": "etherplus", "side": "auto", "n_blocks": 4}),
    ("ether", {"variant": "etherplus", "side": "both", "n_blocks": 4}),
    ("dct", {"n_frequency": 700}),
    ("surm", {"variant": "circulant"}),
    ("surm", {"variant": "toeplitz"}),
    ("surm", {"variant": "kronecker", "kron_factor": 32}),
]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_random_adapter(engine, weights: dict, name: str, family: str, raw: dict, seed: int) -> str:
    """Register a random (non-zero) adapter of ``family`` with config ``raw`` on the 7 projections
    of ``engine``'s model (``weights``: path -> float32 base weight); returns ``name``."""
    from server.methods import Adapter

    method = get_method(family)
    cfg = method.parse_config({"peft_type": method.peft_type, "target_modules": TARGETS, **raw})
    g = torch.Generator().manual_seed(seed)
    mods = {p: method.init_module_params(cfg, p, w, "random", g) for p, w in weights.items()}
    engine.add_adapter(name, Adapter(method, cfg, mods, dict(engine.base.module_shapes)))
    return name


# The decode-step benchmarks' batch (this module's --engine, bench/dispatch.py,
# bench/kernel_profile.py): 32 requests of 32 prompt tokens over one of these mixes.
STEP_PROMPTS = [[100 + (7 * i + j) % 5000 for j in range(32)] for i in range(STEP_ROWS)]
MIXES = ("lora8", "per_family", "ten_configs")


def bench_engine(threads: int, dtype: str = "auto"):
    """``(engine, kernels)``: the default model's engine for the decode-step benchmarks (room for
    every mix's adapters, nothing merged) and its CPU kernel module; exits where none builds."""
    from server.engine.engine import Engine
    from server.engine.loader import load_base_model

    settings = Settings(
        threads=threads, max_batch_size=64, merged_cache_bytes=0, device_adapter_bytes=1 << 30, dtype=dtype
    )
    engine = Engine(load_base_model(settings), settings)
    if engine.planner.kernels is None:
        raise SystemExit("the kernels cannot be built here")
    return engine, engine.planner.kernels


def add_mix(engine, mix: str) -> list[str]:
    """Register ``mix``'s random adapters on ``engine``; returns the adapter id of each of the
    step's 32 requests. ``lora8``: 8 LoRA r8, 4 requests each; ``per_family``: 32 adapters of the 5
    families' default configs; ``ten_configs``: 32 over the 10 configs."""
    weights = {p: m.base.weight.float() for p, m in engine.base.modules.items()}
    if mix == "lora8":
        names = [add_random_adapter(engine, weights, f"l{i}", *MIX[0], 900 + i) for i in range(8)]
        return [names[i % 8] for i in range(STEP_ROWS)]
    configs, prefix, seed = {"per_family": (PER_FAMILY, "f", 300), "ten_configs": (TEN_CONFIGS, "t", 0)}[mix]
    return [
        add_random_adapter(engine, weights, f"{prefix}{i}", *configs[i % len(configs)], seed + i)
        for i in range(STEP_ROWS)
    ]


def interleaved(scenarios: dict, measure, rounds: int, digits: int = 1) -> tuple[dict, dict]:
    """``measure(*scenario)`` for every scenario once (warm-up), then ``rounds`` rounds of all of
    them in turn (a drifting machine hits every scenario alike), each round printed. Returns the
    runs per scenario and their medians."""
    for s in scenarios.values():
        measure(*s)
    runs: dict[str, list[float]] = {name: [] for name in scenarios}
    for r in range(rounds):
        for name, s in scenarios.items():
            runs[name].append(measure(*s))
        print(f"round {r + 1}: " + "  ".join(f"{n} {v[-1]:.{digits}f}" for n, v in runs.items()), flush=True)
    return runs, {n: sorted(v)[len(v) // 2] for n, v in runs.items()}


def median_decode_step_ms(engine, prompts, adapters, params) -> float:
    """Submit one request per prompt (its adapter id or None), run the engine dry, and return the
    median step time in ms of the decode steps (the first two steps prefill)."""
    for p, a in zip(prompts, adapters, strict=True):
        engine.submit(p, params, a)
    times, n = [], 0
    while engine.generator.num_running or engine.generator.num_waiting:
        t = time.perf_counter()
        engine.generator.step()
        n += 1
        if n > 2:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def engine_ab(threads: int, rounds: int, new_tokens: int, dtype: str) -> dict:
    """Median decode-step time of 32 requests: no adapter, and each mix with the kernels and with
    the torch code, interleaved round by round (a drifting machine hits every scenario alike)."""
    from server.engine.requests import SamplingParams

    engine, k = bench_engine(threads, dtype)
    mixes = {mix: add_mix(engine, mix) for mix in ("per_family", "ten_configs", "lora8")}
    prompts = STEP_PROMPTS
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)

    def step_ms(adapters, kernels_on: bool) -> float:
        engine.planner.kernels = k if kernels_on else None
        return median_decode_step_ms(engine, prompts, adapters, params)

    scenarios = {"base": ([None] * 32, True)}
    for name, ids in mixes.items():
        scenarios[f"{name} kernels"] = (ids, True)
        scenarios[f"{name} torch"] = (ids, False)
    for ids, on in scenarios.values():  # warm-up: install slots, first calls
        step_ms(ids, on)
    runs: dict[str, list[float]] = {s: [] for s in scenarios}
    for r in range(rounds):
        for s, (ids, on) in scenarios.items():
            runs[s].append(step_ms(ids, on))
        print(f"round {r + 1}: " + "  ".join(f"{s} {v[-1]:.1f}" for s, v in runs.items()), flush=True)
    engine.planner.kernels = k
    med = {s: sorted(v)[len(v) // 2] for s, v in runs.items()}
    return {
        "dtype": str(engine.base.dtype).removeprefix("torch."),
        "threads": threads,
        "step_ms_median": med,
        "step_ms_rounds": runs,
        "base_step_over_scenario": {s: med["base"] / v for s, v in med.items()},
    }


if __name__ == "__main__":
    main()
