"""Batched on-the-fly apply of each family vs the base linear alone, at SmolLM2-135M shapes.

For every family (default-ish config) and every projection shape, 64 token rows are spread over
16 adapters of that family (4 rows each); we time ``batched_linear`` with that group against
``F.linear`` on the same rows, interleaving the two so machine noise hits both alike, and report
the median ratio plus device bytes per resident adapter (prepared slot tensors, all 7 projections
of one layer x 30 layers).

    .venv/bin/python bench/methods.py [--threads 2] [--repeats 300]

Prints a table and writes bench/results/methods.json.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.methods import Group, batched_linear, get_method, stack_prepared  # noqa: E402

SHAPES = {  # name: (out, in), SmolLM2-135M
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
}
PER_LAYER = {"q/o 576x576": 2, "k/v 192x576": 2, "gate/up 1536x576": 2, "down 576x1536": 1}
N_LAYERS = 30
FAMILIES = {
    "lora r8": ("lora", {"r": 8, "lora_alpha": 16}),
    "hut r1": ("hut", {"r": 1}),
    "hut r1 γβ": ("hut", {"r": 1, "use_scale_shift": True}),
    "hut r4 (on the fly)": ("hut", {"r": 4}),
    "ether 1-side": ("ether", {"variant": "ether", "side": "auto", "n_blocks": 4}),
    "ether+ 2-side": ("ether", {"variant": "etherplus", "side": "both", "n_blocks": 4}),
    "dct n700": ("dct", {"n_frequency": 700}),
    "surm circulant": ("surm", {"variant": "circulant"}),
    "surm toeplitz": ("surm", {"variant": "toeplitz"}),
    "surm kronecker f32": ("surm", {"variant": "kronecker", "kron_factor": 32}),
    "surm ldr r4": ("surm", {"variant": "ldr", "ldr_rank": 4}),
    # PEFT types (docs/adapter-format.md, PEFT types); HiRA is served merged, timed here on the fly
    "dora r8": ("dora", {"peft_type": "LORA", "use_dora": True, "r": 8, "lora_alpha": 16}),
    "ia3": ("ia3", {}),
    "vera r256": ("vera", {"r": 256}),
    "hira r8 (on the fly)": ("hira", {"r": 8}),
    "hra r8": ("hra", {"r": 8}),
    "hra r8 GS": ("hra", {"r": 8, "apply_GS": True}),
    "loha r8": ("loha", {"r": 8, "alpha": 8}),
    "lokr r8": ("lokr", {"r": 8, "alpha": 8}),
    "c3a b64": ("c3a", {"block_size": 64}),  # 64 divides 192, 576 and 1536
    "fourierft n1000": ("fourierft", {"n_frequency": 1000, "scaling": 300.0}),
    "oft b32": ("oft", {"oft_block_size": 32, "r": 0, "peft_version": "0.21.2"}),  # 32 divides 576, 1536
    "boft b8 f2": ("boft", {"boft_block_size": 8, "boft_n_butterfly_factor": 2}),
}


def time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(10):
        fn_a(), fn_b()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    print(f"{'family':22s} " + " ".join(f"{s:>17s}" for s in SHAPES) + f" {'bytes/adapter':>14s}")
    for label, (family, raw) in FAMILIES.items():
        method = get_method(family)
        cfg = method.parse_config({"peft_type": family.upper(), "target_modules": ["x"], **raw})
        ratios, nbytes = {}, 0
        for sname, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f) / in_f**0.5
            g = torch.Generator().manual_seed(1)
            prepared = [
                method.prepare(cfg, method.init_params(cfg, w, "random", g), w) for _ in range(args.adapters)
            ]
            table = stack_prepared(prepared)
            slot_bytes = sum(t[0].numel() * t.element_size() for t in table.values())
            nbytes += slot_bytes * PER_LAYER[sname] * N_LAYERS
            x = torch.randn(args.rows, in_f)
            rows = torch.arange(args.rows)
            slots = rows % args.adapters
            group = Group(method, method.signature(cfg, out_f, in_f), table, rows, slots)
            with torch.no_grad():
                t_base, t_ad = time_pair(
                    lambda x=x, w=w: F.linear(x, w),
                    lambda x=x, w=w, group=group: batched_linear(x, w, None, [group]),
                    args.repeats,
                )
            ratios[sname] = t_ad / t_base
        results.append(
            {"family": label, "config": raw, "time_ratio": ratios, "device_bytes_per_adapter": nbytes}
        )
        print(f"{label:22s} " + " ".join(f"{ratios[s]:16.3f}x" for s in SHAPES) + f" {nbytes:14,d}")
    out = Path(__file__).parent / "results" / "methods.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "threads": args.threads,
        "rows": args.rows,
        "adapters": args.adapters,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "repeats": args.repeats,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
