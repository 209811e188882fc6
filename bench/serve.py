"""Serving benchmark on SmolLM2-135M: adapter overheads, batching gain, cold loads, scale.

All ratios come from one process and one run. Every throughput scenario runs between two
no-adapter runs, in ``--rounds`` rounds; its ratio is taken against the mean of those two
neighbours and the median over rounds is reported (with the spread), so the slow drift of a noisy
machine hits both sides of every ratio.

    .venv/bin/python bench/serve.py [--requests 32] [--new-tokens 64] [--threads 2] [--dtype auto] [--quick]

Scenarios (32 concurrent requests, 64 new tokens each, EOS ignored so lengths are fixed):
  base       no adapter
  mixed_per_family  32 requests on 32 distinct adapters, the 5 families in their default configs
             (LoRA r8, HUT r1, ETHER+, DCT, SURM circulant), on the fly: the issue's "mixed" target
  mixed      the same with 10 configs: every variant, incl. SURM Toeplitz and ETHER+ two-sided
  mixed_all_types  32 requests on 32 adapters of every registered type (PEFT's too: DoRA, IA3,
             VeRA, HiRA, HRA, LoHa, LoKr, C3A, FourierFT, OFT, BOFT, and SURM LDR); each is served
             as the policy serves it (on the fly, or merged where its on-the-fly form costs GEMMs)
  merged     32 requests on one adapter, served from merged weights
  sequential the same requests one after another (batching gain; measured on a subset)
  hf         transformers' own batched generate on the same prompts (plain model)
  cold       added time-to-first-token of a first request to an adapter that is only on disk
  scale      1,000 distinct adapters round-robin under a small device budget

Prints a table and writes bench/results/serve.json. Runs unchanged on CUDA (device picked by
the engine settings); pass --model to use a larger model there.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import load_base_model  # noqa: E402
from server.engine.requests import SamplingParams, TokenEvent  # noqa: E402
from server.kernels.microbench import PER_FAMILY, TEN_CONFIGS  # noqa: E402
from server.methods import Adapter, available_methods, get_method  # noqa: E402
from server.settings import Settings  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The 10 configs served on the fly and the 5 families in default configs (shared with
# server/kernels/microbench.py's --engine scenarios).
MIX, MIX_PER_FAMILY = TEN_CONFIGS, PER_FAMILY
# One config of every registered type, SmolLM2 sizes (hidden 576, k/v 192, MLP 1536).
ALL_TYPES = [
    ("lora", {"r": 8, "lora_alpha": 16}),
    ("dora", {"use_dora": True, "r": 8, "lora_alpha": 16}),
    ("hut", {"r": 1}),
    ("ia3", {"feedforward_modules": ["down_proj"]}),
    ("hira", {"r": 8}),  # HUT rank 9: merged by policy
    ("ether", {"variant": "etherplus", "side": "auto", "n_blocks": 4}),
    ("hra", {"r": 8}),
    ("dct", {"n_frequency": 700}),
    ("surm", {"variant": "circulant"}),
    ("surm", {"variant": "ldr", "ldr_rank": 4}),
    ("vera", {"r": 64}),
    ("loha", {"r": 4, "alpha": 8}),
    ("lokr", {"r": 8, "alpha": 8}),
    ("c3a", {"block_size": 64}),  # 64 divides 192, 576 and 1536
    ("fourierft", {"n_frequency": 1000, "scaling": 300.0}),
    ("oft", {"oft_block_size": 32, "r": 0, "peft_version": "0.21.2"}),
    ("boft", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}),
]


def make_adapter(engine: Engine, family: str, raw: dict, seed: int, scale: float = 0.02) -> Adapter:
    """Random non-zero adapter; parameters shrunk toward identity so the model stays sensible."""
    method = get_method(family)
    cfg = method.parse_config({"peft_type": method.peft_type, "target_modules": TARGETS, **raw})
    g = torch.Generator().manual_seed(seed)
    weights = _float32_weights(engine)
    modules = {path: method.init_module_params(cfg, path, w, "random", g) for path, w in weights.items()}
    return Adapter(method, cfg, modules, dict(engine.base.module_shapes))


_WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}


def _float32_weights(engine: Engine) -> dict[str, torch.Tensor]:
    """The base linears' weights in float32 on the CPU, made once per engine: a bf16 model's fresh
    float32 copy per adapter (540 MB for SmolLM2) fragmented the heap until the scale scenario's
    hundreds of adapters ran the process out of memory (RSS +160 MB per adapter, live tensors flat)."""
    if id(engine) not in _WEIGHTS:
        modules = engine.base.modules.items()
        _WEIGHTS[id(engine)] = {p: m.base.weight.detach().float().cpu() for p, m in modules}
    return _WEIGHTS[id(engine)]


def run_batch(engine: Engine, prompts, adapters, params) -> tuple[float, int, list[float]]:
    """Submit everything at once, step until done; returns (seconds, tokens, ttfts)."""
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, a) for p, a in zip(prompts, adapters, strict=True)]
    first: dict[int, float] = {}
    tokens = 0
    while engine.generator.num_running or engine.generator.num_waiting:
        engine.generator.step()
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            for ev in r.sink.drain():
                if isinstance(ev, TokenEvent):
                    tokens += 1
                    first.setdefault(i, now - t0)
    return time.perf_counter() - t0, tokens, [first[i] for i in sorted(first)]


def hf_generate(model, prompts, new_tokens) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - t0, (out.shape[1] - width) * len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto", help="auto (the server's default) / float32 / bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequential", type=int, default=8, help="requests timed one after another")
    ap.add_argument("--scale-adapters", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every throughput scenario")
    ap.add_argument("--cold-adapters", type=int, default=20, help="first requests timed (p50 reported)")
    ap.add_argument("--kv-cache", default="paged", help="paged (the default) or padded (the old cache)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--out", type=Path, default=None, help="results file (default bench/results/serve.json)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.sequential, args.scale_adapters = 8, 8, 2, 40
        args.rounds, args.cold_adapters = 1, 4
    torch.set_num_threads(args.threads)
    overrides = {
        "threads": args.threads,
        "max_batch_size": max(64, args.requests),
        "merged_cache_bytes": 2 << 30,
        "merge_after_steps": 1,
        "device_adapter_bytes": 1 << 30,
        "dtype": args.dtype,
        "kv_cache": args.kv_cache,
    }
    if args.model:
        overrides["model"] = args.model
    settings = Settings(**overrides)
    engine = Engine(load_base_model(settings), settings)
    device = engine.base.device
    vocab = engine.base.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab - 100, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.requests)
    ]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    results: dict = {
        "meta": {
            "model": engine.base.name,
            "device": str(device),
            "dtype": str(engine.base.dtype).removeprefix("torch."),
            "threads": args.threads,
            "kv_cache": type(engine.generator).__name__,
            "requests": args.requests,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
    }

    # Adapters: 32 distinct across families (mixed), one LoRA served merged, one HUT r4 merged.
    ids = []
    for i in range(args.requests):
        family, raw = MIX[i % len(MIX)]
        engine.add_adapter(f"mix{i}", make_adapter(engine, family, raw, seed=i))
        ids.append(f"mix{i}")
    ids5 = []
    for i in range(args.requests):
        family, raw = MIX_PER_FAMILY[i % len(MIX_PER_FAMILY)]
        engine.add_adapter(f"fam{i}", make_adapter(engine, family, raw, seed=300 + i))
        ids5.append(f"fam{i}")
    missing = set(available_methods()) - {family for family, _ in ALL_TYPES}
    if missing:
        raise SystemExit(f"ALL_TYPES lacks a config for {sorted(missing)}")
    ids_all = []
    for i in range(args.requests):
        family, raw = ALL_TYPES[i % len(ALL_TYPES)]
        engine.add_adapter(f"all{i}", make_adapter(engine, family, raw, seed=600 + i))
        ids_all.append(f"all{i}")
    engine.add_adapter("hot", make_adapter(engine, "lora", {"r": 8, "lora_alpha": 16}, seed=999))
    engine.add_adapter("hut4", make_adapter(engine, "hut", {"r": 4}, seed=998))
    # As `python -m server` does once ready: keep start-up objects out of the GC's full scans.
    gc.collect()
    gc.freeze()
    # Warm-up: one short pass per scenario (installs slots, builds merged weights, warms kernels).
    warm = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    run_batch(engine, prompts, [None] * args.requests, warm)
    run_batch(engine, prompts, ids, warm)
    run_batch(engine, prompts, ids5, warm)
    run_batch(engine, prompts, ids_all, warm)
    run_batch(engine, prompts, ["hot"] * args.requests, warm)
    run_batch(engine, prompts, ["hut4"] * args.requests, warm)

    rows: dict = {}

    def measure(name, adapters) -> float:
        s, tok, ttft = run_batch(engine, prompts, adapters, params)
        row = rows.setdefault(name, {"tokens": tok, "runs_tokens_per_s": [], "runs_ttft_p50_s": []})
        row["runs_tokens_per_s"].append(tok / s)
        row["runs_ttft_p50_s"].append(statistics.median(ttft))
        print(f"  {name:18s} {tok / s:8.1f} tok/s  ({tok} tokens in {s:.1f} s)", flush=True)
        return tok / s

    # Every scenario runs between two no-adapter runs, in several rounds; its ratio is taken against
    # the mean of its two neighbours and the median over rounds is reported (machine noise drifts
    # over seconds, so a baseline measured minutes away is not comparable).
    scenarios = {
        "mixed": ids,
        "mixed_per_family": ids5,
        "mixed_all_types": ids_all,
        "merged": ["hot"] * args.requests,
        "hut_r4_merged": ["hut4"] * args.requests,
    }
    round_ratios: dict[str, list[float]] = {k: [] for k in scenarios}
    print(f"throughput ({args.rounds} rounds):")
    before = measure("base", [None] * args.requests)
    for _ in range(args.rounds):
        for name, adapters in scenarios.items():
            tps = measure(name, adapters)
            after = measure("base", [None] * args.requests)
            round_ratios[name].append(tps / ((before + after) / 2))
            before = after
    for row in rows.values():
        row["tokens_per_s"] = statistics.median(row["runs_tokens_per_s"])
        row["ttft_p50_s"] = statistics.median(row["runs_ttft_p50_s"])
    base_tps = rows["base"]["tokens_per_s"]

    # Sequential: same requests one at a time.
    t_seq, tok_seq = 0.0, 0
    for p in prompts[: args.sequential]:
        s, tok, _ = run_batch(engine, [p], [None], params)
        t_seq, tok_seq = t_seq + s, tok_seq + tok
    rows["sequential"] = {"seconds": t_seq, "tokens": tok_seq, "tokens_per_s": tok_seq / t_seq}
    print(f"  sequential   {tok_seq / t_seq:8.1f} tok/s  ({args.sequential} requests)")

    # transformers' own batched generate on a plain (unwrapped) copy of the model.
    from transformers import AutoModelForCausalLM

    from server.engine.model_cache import provision_default_model

    src = settings.model if args.model else str(provision_default_model(settings.model_cache_dir))
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=engine.base.dtype).to(device).eval()
    hf_generate(plain, prompts[:4], 2)
    s, tok = hf_generate(plain, prompts, args.new_tokens)
    rows["hf_generate"] = {"seconds": s, "tokens": tok, "tokens_per_s": tok / s}
    print(f"  hf generate  {tok / s:8.1f} tok/s")
    del plain

    # Cold adapter: TTFT of a request alone to an adapter only on disk vs one already resident,
    # on the on-the-fly path (merging is for hot adapters; it is switched off here so the
    # first step does not also build a merged copy).
    engine.residency.merged_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for i in range(args.cold_adapters):
            family, raw = MIX[i % len(MIX)]
            folder = Path(tmp) / f"cold{i}"
            make_adapter(engine, family, raw, seed=500 + i).save(folder)
            folders.append(folder)
        shapes = engine.base.module_shapes
        short = SamplingParams(max_new_tokens=1, temperature=0)
        added = []
        for i, folder in enumerate(folders):
            engine.add_adapter(f"warm{i}", Adapter.load(folder, shapes))
            run_batch(engine, [prompts[0]], [f"warm{i}"], short)  # now resident
            warm_s = statistics.median(
                run_batch(engine, [prompts[0]], [f"warm{i}"], short)[2][0] for _ in range(3)
            )
            t0 = time.perf_counter()
            engine.add_adapter(f"cold{i}", Adapter.load(folder, shapes))  # read + validate from disk
            load_s = time.perf_counter() - t0
            _, _, cold_ttft = run_batch(engine, [prompts[0]], [f"cold{i}"], short)
            added.append(load_s + cold_ttft[0] - warm_s)
    rows["cold_added_latency"] = {"p50_s": statistics.median(added), "max_s": max(added)}
    print(f"  cold adapter added latency p50 {statistics.median(added) * 1000:.1f} ms")

    # Scale: many distinct adapters round-robin under a small device budget.
    budget = 48 << 20
    engine.residency.device_bytes = budget
    engine.residency.merged_bytes = 0
    n_scale, errors, peak = args.scale_adapters, 0, 0
    small = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    per_family: dict[str, int] = {}
    t0 = time.perf_counter()
    for start in range(0, n_scale, args.requests):
        batch_ids = []
        for i in range(start, min(start + args.requests, n_scale)):
            family, raw = MIX[i % len(MIX)]
            engine.add_adapter(f"s{i}", make_adapter(engine, family, raw, seed=10_000 + i))
            batch_ids.append(f"s{i}")
        reqs = [engine.submit(prompts[0][:8], small, a) for a in batch_ids]
        while engine.generator.num_running or engine.generator.num_waiting:
            engine.generator.step()
            peak = max(peak, engine.residency.device_used)
        for r in reqs:
            evs = r.sink.drain()
            errors += evs[-1].finish_reason == "error"
        for pool in list(engine.residency._pools.values()):
            per_family[pool.method.name + str(pool.key[1][0][1])] = pool.bytes_per_slot
        for a in batch_ids:  # done with them: they are one-shot
            engine.forget(a, 1)
    rows["scale"] = {
        "adapters": n_scale,
        "errors": errors,
        "device_budget_bytes": budget,
        "peak_device_bytes": peak,
        "seconds": time.perf_counter() - t0,
        "device_bytes_per_adapter": per_family,
    }
    print(
        f"  scale: {n_scale} adapters, {errors} errors, peak device {peak / 2**20:.1f} MiB "
        f"(budget {budget / 2**20:.0f} MiB)"
    )

    ratios = {f"{k}_vs_base": statistics.median(v) for k, v in round_ratios.items()}
    ratios["batching_gain"] = base_tps / rows["sequential"]["tokens_per_s"]
    ratios["base_vs_hf_generate"] = base_tps / rows["hf_generate"]["tokens_per_s"]
    results["round_ratios"] = round_ratios
    results.update(rows=rows, ratios=ratios)
    print("\nratio                         value   target")
    targets = {
        "mixed_per_family_vs_base": ">= 0.80 (goal 0.90)",
        "mixed_vs_base": "(info: every config variant)",
        "mixed_all_types_vs_base": "(info: every registered type)",
        "merged_vs_base": ">= 0.95",
        "batching_gain": ">= 2.5",
        "base_vs_hf_generate": ">= 0.90",
        "hut_r4_merged_vs_base": "(info)",
    }
    for k, v in ratios.items():
        spread = round_ratios.get(k.removesuffix("_vs_base"))
        span = f"  [{min(spread):.2f}-{max(spread):.2f}]" if spread else ""
        print(f"{k:28s} {v:7.3f}   {targets.get(k, '')}{span}")
    print(f"{'cold added latency p50':28s} {rows['cold_added_latency']['p50_s'] * 1000:6.1f}ms  <= 50 ms")
    out = args.out or Path(__file__).parent / "results" / ("serve-quick.json" if args.quick else "serve.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
