"""Serving while a fine-tune trains on the same resident model: TTFT p50 and tokens/s, idle vs busy.

    .venv/bin/python bench/serve_training.py [--requests 16] [--new-tokens 32] [--threads 2]
    .venv/bin/python bench/serve_training.py --quick      # tiny random model, small sizes (smoke)

One process, one run: the engine (no HTTP) serves ``--requests`` concurrent greedy requests
(EOS ignored, fixed lengths) ``--rounds`` times with nothing else running (idle), then again while
a LoRA job of the app's ``JobRunner`` trains on the same base model in its thread (the runner
yields to serving between optimizer steps, as in the server), then idle once more; the idle
numbers are the mean of both idle phases. Writes bench/results/serve_training.json
(serve_training-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.serve as serve_bench  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.requests import SamplingParams  # noqa: E402
from server.jobs.runner import JobRunner, JobSpec  # noqa: E402
from server.settings import Settings  # noqa: E402


def run_batch(engine: Engine, prompts, params) -> tuple[float, int, list[float]]:
    """``bench/serve.py``'s driver, every request on the base model."""
    return serve_bench.run_batch(engine, prompts, [None] * len(prompts), params)


def phase(engine: Engine, prompts, params, rounds: int) -> dict:
    seconds, tokens, ttfts = 0.0, 0, []
    for _ in range(rounds):
        s, tok, ttft = run_batch(engine, prompts, params)
        seconds, tokens, ttfts = seconds + s, tokens + tok, ttfts + ttft
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttfts),
    }


def build(args, data_dir: Path):
    overrides = {
        "threads": args.threads,
        "max_batch_size": max(64, args.requests),
        "data_dir": data_dir,  # a fresh store and jobs folder per run ...
        "models_dir": Settings().model_cache_dir,  # ... but the usual model cache (no re-conversion)
    }
    if args.quick:
        from tests.api.tiny_server import build_tiny, tiny_settings

        settings = tiny_settings(**overrides)
        engine, store = build_tiny(settings)
        records = [
            {"prompt": f"t{1 + i % 30} t{10 + i % 30}", "completion": f"t{40 + i % 20}"} for i in range(64)
        ]
        return engine, store, records
    from server.engine.loader import load_base_model

    if args.model:
        overrides["model"] = args.model
    settings = Settings(**overrides)
    base = load_base_model(settings)
    store = AdapterStore(data_dir / "adapters", base.module_shapes, base.name)
    engine = Engine(
        base, settings, source=lambda key: store.load(*key), current_version=store.current_version
    )
    words = "the quick brown fox jumps over a lazy dog while seven cats watch from the old red barn".split()
    records = [
        {
            "prompt": " ".join(words[(i + k) % len(words)] for k in range(24)),
            "completion": " ".join(words[(3 * i + k) % len(words)] for k in range(16)),
        }
        for i in range(256)
    ]
    return engine, store, records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="batches per phase")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="training micro-batch")
    ap.add_argument("--quick", action="store_true", help="tiny random model, small sizes (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.prompt_tokens, args.rounds = 4, 8, 8, 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine, store, records = build(args, Path(tmp))
        vocab = engine.base.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        lo, hi = (1, vocab - 1) if args.quick else (100, vocab - 100)
        prompts = [
            torch.randint(lo, hi, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)
        ]
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        gen = engine.generator
        runner = JobRunner(
            engine.base,
            store,
            Path(tmp) / "jobs",
            busy=lambda: gen.num_waiting > 0 or gen.num_running > 0,
        )
        run_batch(engine, prompts, SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))

        idle_1 = phase(engine, prompts, params, args.rounds)
        print(
            f"  idle     {idle_1['tokens_per_s']:8.1f} tok/s  ttft p50 {idle_1['ttft_p50_s'] * 1000:.1f} ms"
        )
        jsonl = "".join(json.dumps(r) + "\n" for r in records)
        job = runner.submit(
            JobSpec(
                adapter_id="bench-lora",
                method="lora",
                training_data=jsonl,
                config={"r": 8},  # JobSpec (the HTTP field is method_config)
                hyperparameters={"max_steps": 1_000_000, "batch_size": args.batch_size, "max_length": 64},
            )
        )
        runner.start()
        deadline = time.monotonic() + 600
        while runner.get(job["id"])["step"] < 1:  # training is under way
            if runner.get(job["id"])["status"] != "running" and runner.get(job["id"])["status"] != "queued":
                raise SystemExit(f"the job ended: {runner.get(job['id'])}")
            if time.monotonic() > deadline:
                raise SystemExit("the job did not start")
            time.sleep(0.05)
        step_0 = runner.get(job["id"])["step"]
        t0 = time.perf_counter()
        busy = phase(engine, prompts, params, args.rounds)
        train_steps = runner.get(job["id"])["step"] - step_0
        train_s = time.perf_counter() - t0
        print(f"  training {busy['tokens_per_s']:8.1f} tok/s  ttft p50 {busy['ttft_p50_s'] * 1000:.1f} ms")
        print(f"           ({train_steps} training steps meanwhile)")
        runner.cancel(job["id"])
        runner.stop()
        idle_2 = phase(engine, prompts, params, args.rounds)
        print(
            f"  idle     {idle_2['tokens_per_s']:8.1f} tok/s  ttft p50 {idle_2['ttft_p50_s'] * 1000:.1f} ms"
        )

    idle_tps = (idle_1["tokens_per_s"] + idle_2["tokens_per_s"]) / 2
    idle_ttft = (idle_1["ttft_p50_s"] + idle_2["ttft_p50_s"]) / 2
    ratios = {
        "tokens_per_s_training_vs_idle": busy["tokens_per_s"] / idle_tps,
        "ttft_p50_training_vs_idle": busy["ttft_p50_s"] / idle_ttft,
    }
    results = {
        "meta": {
            "model": engine.base.name,
            "device": str(engine.base.device),
            "threads": args.threads,
            "requests": args.requests,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds,
            "train_batch_size": args.batch_size,
            "quick": args.quick,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "rows": {
            "idle_1": idle_1,
            "training": {**busy, "train_steps": train_steps, "train_steps_per_s": train_steps / train_s},
            "idle_2": idle_2,
        },
        "ratios": ratios,
    }
    for k, v in ratios.items():
        print(f"{k:32s} {v:7.3f}")
    out = (
        Path(__file__).parent
        / "results"
        / ("serve_training-quick.json" if args.quick else "serve_training.json")
    )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
