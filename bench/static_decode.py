"""Static decode shapes and torch.compile on and off (issues 13 and 14, item 4), side by side.

Three engines on one loaded SmolLM2 (the server's dtype, ``--threads`` torch threads), the paged
KV cache, base-model requests (32-token prompts, ``--new`` tokens, EOS ignored):

* ``off``: packed shapes (the default);
* ``eager``: decode steps padded to batch buckets and key multiples, static buffers;
* ``compiled``: the same through ``torch.compile`` (inductor), every bucket compiled at start-up
  (the compile time of each is reported; inductor's on-disk cache makes a second start faster).

Each round runs every batch size on every engine in turn, so a drift of the machine hits them
alike; the table gives decode tokens/s (steps after the prefill) as the median over rounds and
each mode's ratio to ``off``.

    .venv/bin/python bench/static_decode.py [--rounds 3] [--batches 1 8 32] [--threads 2]

Writes bench/results/static-decode.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.engine import Engine  # noqa: E402
from server.engine.loader import load_base_model  # noqa: E402
from server.engine.requests import SamplingParams  # noqa: E402
from server.settings import Settings  # noqa: E402

MODES = ("off", "eager", "compiled")


def build(settings: Settings, modes) -> tuple[dict[str, Engine], dict]:
    base = load_base_model(settings)
    engines, compile_s = {}, {}
    for mode in modes:
        t0 = time.perf_counter()
        engines[mode] = Engine(base, settings.model_copy(update={"static_decode": mode}))
        compile_s[mode] = round(time.perf_counter() - t0, 1)
    return engines, compile_s


def decode_rate(engine: Engine, batch: int, new: int) -> float:
    """Decode tokens/s of ``batch`` base requests (32-token prompts): steps after the first."""
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.submit([(7 * i + 3 * j) % 4000 + 10 for j in range(32)], params)
    gen = engine.generator
    gen.step()  # the prefill (and first token) of every row
    t0, steps = time.perf_counter(), 0
    while gen.num_running or gen.num_waiting:
        gen.step()
        steps += 1
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default="bench/results/static-decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(threads=args.threads, max_batch_size=max(args.batches))
    engines, start_s = build(settings, args.modes)
    dtype = str(next(iter(engines.values())).base.dtype).removeprefix("torch.")
    rates = {m: {b: [] for b in args.batches} for m in args.modes}
    for r in range(args.rounds):
        for b in args.batches:
            for m in args.modes:
                rates[m][b].append(decode_rate(engines[m], b, args.new))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    table = {m: {b: statistics.median(v) for b, v in per.items()} for m, per in rates.items()}
    print(f"\nSmolLM2-135M {dtype}, {args.threads} threads, decode tokens/s (median of {args.rounds})")
    print(f"{'mode':<10}" + "".join(f"{'B=' + str(b):>16}" for b in args.batches) + "   engine start (s)")
    for m in args.modes:
        cells = "".join(f"{table[m][b]:>9.1f} ({table[m][b] / table['off'][b]:.2f}x)" for b in args.batches)
        print(f"{m:<10}{cells}   {start_s[m]}")
    compiled = engines.get("compiled")
    if compiled is not None:
        print("compile seconds per bucket:", compiled.static_decode.compile_seconds)
    result = {
        "machine": platform.processor() or platform.machine(),
        "dtype": dtype,
        "threads": args.threads,
        "new_tokens": args.new,
        "decode_tokens_per_s": table,
        "all_rounds": rates,
        "engine_start_s": start_s,
        "compile_s_per_bucket": compiled.static_decode.compile_seconds if compiled else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
