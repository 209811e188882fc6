"""KV cache layers side by side: transformers' DynamicLayer (torch.cat every step) vs GrowingLayer
(the step's column written in place), no-adapter decode on SmolLM2, steps alternating one by one.

    .venv/bin/python bench/kv_cache.py [--dtype float32] [--threads 1] [--new-tokens 48] [--rounds 3]
        [--batches 1,32] [--prompt-tokens 32] [--tag long]

Writes bench/results/kv-cache-<dtype>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtype import step_pairs  # noqa: E402  (bench/dtype.py)

from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import dtype_name, load_base_model  # noqa: E402
from server.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(threads=args.threads, dtype=args.dtype, max_batch_size=64)
    base = load_base_model(settings)
    engines = {"dynamic": Engine(base, settings), "growing": Engine(base, settings)}  # one model
    config = base.model.config
    engines["dynamic"].generator.cache_factory = lambda: DynamicCache(config=config)
    vocab = config.vocab_size
    g = torch.Generator().manual_seed(0)
    n = args.prompt_tokens
    prompts = [torch.randint(100, vocab - 100, (n,), generator=g).tolist() for _ in range(64)]
    gc.collect()
    gc.freeze()
    batches = [int(b) for b in args.batches.split(",")]
    meta = {"dtype": dtype_name(base.dtype), "threads": args.threads, "prompt_tokens": args.prompt_tokens}
    results: dict = {"meta": meta, "decode": {}}
    for b in batches:
        step_pairs(engines, prompts[:b], 2)  # warm-up
        times = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, t in step_pairs(engines, prompts[:b], args.new_tokens).items():
                times[name] += t
        speedup = [d / gr for d, gr in zip(times["dynamic"], times["growing"], strict=True)]
        row = {f"{n}_step_ms": statistics.median(t) * 1000 for n, t in times.items()}
        q = statistics.quantiles(speedup, n=4)
        row.update(speedup=statistics.median(speedup), speedup_quartiles=[q[0], q[2]], steps=len(speedup))
        results["decode"][f"batch{b}"] = row
        print(
            f"batch {b:<3d} step dynamic {row['dynamic_step_ms']:.1f} ms  "
            f"growing {row['growing_step_ms']:.1f} ms"
            f"  speed-up {row['speedup']:.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, {len(speedup)} pairs)",
            flush=True,
        )
    tag = f"-{args.tag}" if args.tag else ""
    out = Path(__file__).parent / "results" / f"kv-cache-{meta['dtype']}{tag}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
