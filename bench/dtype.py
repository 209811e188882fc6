"""float32 vs bfloat16: no-adapter decode through the engine, side by side in one run.

Decides what ``--dtype auto`` picks on a CPU: both engines are loaded in one process, each
prefills the same batch, and their decode steps alternate one by one (fp32 step, bf16 step, ...)
for ``--rounds`` x ``--new-tokens`` step pairs at each batch size; the median step time of each and
the median over step pairs of the speed-up are reported. Also times the bare projection GEMMs
(60 x ``F.linear`` 1536x576, SmolLM2's MLP shape) at M=1 and M=32 in both dtypes.

    .venv/bin/python bench/dtype.py [--rounds 5] [--new-tokens 16] [--threads 2]

Also reports the greedy agreement of bf16 with fp32 on a fixed set of 16 chat prompts.

Writes bench/results/dtype-threads<N>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import cpu_flags, load_base_model  # noqa: E402
from server.engine.requests import SamplingParams, TokenEvent  # noqa: E402
from server.settings import Settings  # noqa: E402


def step_pairs(engines: dict[str, Engine], prompts: list[list[int]], steps: int) -> dict[str, list[float]]:
    """Per-step decode seconds of each engine, the engines' steps alternating one by one.

    Both batches are prefilled first; then every round times one decode step of each engine in
    turn, so a burst of load from the rest of a shared machine hits both sides of a pair alike.
    """
    params = SamplingParams(max_new_tokens=steps + 1, temperature=0, ignore_eos=True)
    reqs = {name: [e.submit(p, params, None) for p in prompts] for name, e in engines.items()}
    for e in engines.values():
        e.generator.step()  # the prefill
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, e in engines.items():
            t0 = time.perf_counter()
            e.generator.step()
            times[name].append(time.perf_counter() - t0)
    for name, e in engines.items():
        while e.generator.num_running or e.generator.num_waiting:
            e.generator.step()
        for r in reqs[name]:
            r.sink.drain()
    return times


QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a mammal that can fly.",
    "Give me a synonym for happy.",
    "What does a thermometer measure?",
    "Describe the colour blue to someone.",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What is the boiling point of water in Celsius?",
    "Summarise the plot of Cinderella.",
    "How many legs does a spider have?",
]


def greedy_tokens(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations (EOS honoured) of ``prompts`` in one batch."""
    params = SamplingParams(max_new_tokens=n, temperature=0)
    reqs = [engine.submit(p, params, None) for p in prompts]
    while engine.generator.num_running or engine.generator.num_waiting:
        engine.generator.step()
    return [[e.token_id for e in r.sink.drain() if isinstance(e, TokenEvent)] for r in reqs]


def agreement(engines: dict[str, Engine], n: int) -> dict:
    """bf16 vs fp32 greedy on a fixed chat prompt set: the share of fp32's tokens bf16 reproduces
    before the two first differ, and how many prompts agree throughout."""
    tok = engines["float32"].base.tokenizer
    prompts = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    ref = greedy_tokens(engines["float32"], prompts, n)
    got = greedy_tokens(engines["bfloat16"], prompts, n)
    same = [
        next((i for i, (a, b) in enumerate(zip(r, o, strict=False)) if a != b), min(len(r), len(o)))
        for r, o in zip(ref, got, strict=True)
    ]
    whole = sum(r == o for r, o in zip(ref, got, strict=True))
    return {
        "prompts": len(prompts),
        "new_tokens": n,
        "token_agreement_rate": sum(same) / sum(len(r) for r in ref),
        "prompts_identical": whole,
    }


def gemm_ms(ws: list[torch.Tensor], m: int, reps: int = 5) -> tuple[float, float]:
    """Median wall and CPU ms of one F.linear per weight of ``ws`` at M=m (distinct weights, as in
    a decode step)."""
    x = torch.randn(m, ws[0].shape[1], dtype=ws[0].dtype)
    wall, cpu = [], []
    for _ in range(reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for w in ws:
            F.linear(x, w)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engines = {}
    for name in ("float32", "bfloat16"):
        s = Settings(threads=args.threads, dtype=name, max_batch_size=max(64, *batches))
        engines[name] = Engine(load_base_model(s), s)
    vocab = engines["float32"].base.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab - 100, (args.prompt_tokens,), generator=g).tolist() for _ in range(64)
    ]
    gc.collect()
    gc.freeze()
    for b in batches:  # warm-up
        step_pairs(engines, prompts[:b], 2)

    flags = cpu_flags()
    results: dict = {
        "meta": {
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
        },
        "gemm_60x1536x576_ms": {},
        "decode": {},
    }
    weights = {d: [torch.randn(1536, 576).to(getattr(torch, d)) for _ in range(60)] for d in engines}
    for m in (1, 32):
        runs: dict[str, list[tuple[float, float]]] = {d: [] for d in weights}
        for _ in range(args.rounds):  # interleaved, as the decode runs below
            for d, ws in weights.items():
                runs[d].append(gemm_ms(ws, m))
        row = {d: statistics.median(w for w, _ in v) for d, v in runs.items()}
        cpu = {d: statistics.median(c for _, c in v) for d, v in runs.items()}
        results["gemm_60x1536x576_ms"][f"M={m}"] = {**row, "cpu_ms": cpu, "runs_wall_cpu_ms": runs}
        print(
            f"GEMM M={m:<3d} fp32 {row['float32']:6.1f} ms   bf16 {row['bfloat16']:6.1f} ms   "
            f"(CPU ms: fp32 {cpu['float32']:6.1f}, bf16 {cpu['bfloat16']:6.1f})",
            flush=True,
        )
    del weights
    for b in batches:
        times = {"float32": [], "bfloat16": []}
        for _ in range(args.rounds):
            for name, t in step_pairs(engines, prompts[:b], args.new_tokens).items():
                times[name] += t
        ratios = [fp / bf for fp, bf in zip(times["float32"], times["bfloat16"], strict=True)]
        fp_ms, bf_ms = (statistics.median(times[d]) * 1000 for d in ("float32", "bfloat16"))
        q = statistics.quantiles(ratios, n=4)
        row = {
            "float32_step_ms": fp_ms,
            "bfloat16_step_ms": bf_ms,
            "float32_tokens_per_s": b * 1000 / fp_ms,
            "bfloat16_tokens_per_s": b * 1000 / bf_ms,
            "bf16_speedup": statistics.median(ratios),  # median over step pairs of fp32 / bf16 time
            "bf16_speedup_quartiles": [q[0], q[2]],
            "steps": len(ratios),
            "runs_step_s": times,
        }
        results["decode"][f"batch{b}"] = row
        print(
            f"decode batch {b:<3d} step fp32 {fp_ms:6.1f} ms  bf16 {bf_ms:6.1f} ms   bf16 speed-up "
            f"{row['bf16_speedup']:.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}, {len(ratios)} step pairs)",
            flush=True,
        )
    results["greedy_agreement"] = agree = agreement(engines, args.new_tokens)
    print(
        f"greedy agreement bf16 vs fp32: {agree['token_agreement_rate']:.2f} of tokens, "
        f"{agree['prompts_identical']}/{agree['prompts']} prompts identical",
        flush=True,
    )
    out = Path(__file__).parent / "results" / f"dtype-threads{args.threads}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
