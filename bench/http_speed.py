"""Issue 13's HTTP targets, side by side in one run, against plain transformers and the floor.

1. Plain transformers ``generate`` (greedy, an unwrapped copy of the model) in float32 and in the
   server's dtype: batch 1 and batch 32, 32-token prompts, 64 new tokens.
2. ``python -m server`` (defaults: dtype auto, the paged KV cache) on loopback, through
   ``/v1/completions`` (EOS banned with ``logit_bias`` so every completion has its full length):
   * one stream (SSE): tokens/s and inter-token latency p50;
   * 32 concurrent, no adapter;
   * 32 concurrent over 8 PEFT LoRA r8 adapters on the 7 projections (uploaded over the API,
     built by PEFT itself with random non-zero weights), 4 requests each;
   rounds alternate the scenarios so a drift of the machine hits them alike.
3. The single-stream floor: the weight bytes read per decode step / the memory bandwidth measured
   here (a large tensor copy).

    .venv/bin/python bench/http_speed.py [--rounds 3] [--threads 2] [--out NAME.json]

Writes bench/results/http-speed.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import launch  # noqa: E402  (bench/load.py: python -m server on a free port)
from serve import hf_generate  # noqa: E402

from server.engine.model_cache import provision_default_model  # noqa: E402
from server.settings import DEFAULT_MODEL, Settings  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bandwidth_gbs() -> float:
    """Copy bandwidth (read + write) of a 512 MiB float32 tensor, best of 5, in GB/s."""
    a = torch.ones(1 << 27)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def peft_loras(src: str, folder: Path, n: int) -> list[Path]:
    """``n`` PEFT LoRA r8 folders on the 7 projections, random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        peft = get_peft_model(model, cfg)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.mul_(0.05)  # small deltas: the text stays the model's, the work is the same
        path = folder / f"lora{i}"
        peft.save_pretrained(path)
        out.append(path)
    return out


async def upload(client: httpx.AsyncClient, adapter_id: str, folder: Path) -> None:
    files = {
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes(), "application/json"),
        "weights": (
            "adapter_model.safetensors",
            (folder / "adapter_model.safetensors").read_bytes(),
            "application/octet-stream",
        ),
    }
    r = await client.post("/adapters", data={"adapter_id": adapter_id}, files=files)
    r.raise_for_status()


def body(prompt: str, eos: int, n: int, adapter: str | None = None, stream: bool = False) -> dict:
    return {
        "model": adapter or DEFAULT_MODEL,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "logit_bias": {str(eos): -100},
        "stream": stream,
    }


async def one_stream(client: httpx.AsyncClient, b: dict) -> tuple[float, float, int]:
    """(tokens/s from the first token on, ITL p50 s, tokens) of one SSE stream."""
    times = []
    async with client.stream("POST", "/v1/completions", json=b) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"text"' in line:
                times.append(time.perf_counter())
    gaps = [y - x for x, y in zip(times, times[1:], strict=False)]
    return (len(times) - 1) / (times[-1] - times[0]), statistics.median(gaps), len(times)


async def concurrent(client: httpx.AsyncClient, bodies: list[dict]) -> tuple[float, int]:
    """(tokens/s, tokens) of all ``bodies`` sent at once."""
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    elapsed = time.perf_counter() - t0
    tokens = 0
    for r in answers:
        r.raise_for_status()
        tokens += r.json()["usage"]["completion_tokens"]
    return tokens / elapsed, tokens


async def serve_rounds(url: str, prompts: list[str], eos: int, args, loras: list[Path]) -> dict:
    n = args.new_tokens
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i, folder in enumerate(loras):
            await upload(client, f"lora{i}", folder)
        base = [body(p, eos, n) for p in prompts]
        mixed = [body(p, eos, n, f"lora{i % len(loras)}") for i, p in enumerate(prompts)]
        await concurrent(client, base[:4] + mixed[:8])  # warm: adapters loaded, kernels ready
        rows: dict[str, list] = {
            "stream_tok_s": [],
            "stream_itl_p50_s": [],
            "base32_tok_s": [],
            "lora32_tok_s": [],
        }
        for _ in range(args.rounds):
            tok_s, itl, _ = await one_stream(client, body(prompts[0], eos, n, stream=True))
            rows["stream_tok_s"].append(tok_s)
            rows["stream_itl_p50_s"].append(itl)
            rows["base32_tok_s"].append((await concurrent(client, base))[0])
            rows["lora32_tok_s"].append((await concurrent(client, mixed))[0])
            print("  round:", {k: round(v[-1], 4) for k, v in rows.items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--out", default="http-speed.json", help="file name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = Settings()
    src = str(provision_default_model(settings.model_cache_dir))
    tok = AutoTokenizer.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(100, tok.vocab_size - 100, (args.prompt_tokens,), generator=g).tolist()
        for _ in range(args.requests)
    ]
    prompts = [tok.decode(p) for p in ids]
    eos = tok.eos_token_id
    results: dict = {"meta": {"args": vars(args), "torch": torch.__version__, "machine": platform.machine()}}

    # 1. plain transformers, float32 and bf16, batch 1 and batch 32
    hf = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        hf_generate(model, ids[:2], 2)
        name = str(dtype).removeprefix("torch.")
        for batch in (1, args.requests):
            runs = [hf_generate(model, ids[:batch], args.new_tokens) for _ in range(2)]
            hf[f"{name}_batch{batch}_tok_s"] = max(t / s for s, t in runs)
        if dtype == torch.bfloat16:
            results["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
    results["hf_generate"] = hf
    print("plain generate:", {k: round(v, 1) for k, v in hf.items()}, flush=True)

    # 2. the server over HTTP
    with tempfile.TemporaryDirectory() as tmp:
        loras = peft_loras(src, Path(tmp), 8)
        flags = ["--threads", str(args.threads), "--max-batch-size", "64"]
        with launch(False, None, flags) as server:
            rows = asyncio.run(serve_rounds(server.url, prompts, eos, args, loras))
    http = {k: statistics.median(v) for k, v in rows.items()}
    results["http"] = {**http, "runs": rows}

    # 3. the floor
    bw = bandwidth_gbs()
    floor_s = results["weight_bytes"] / (bw * 1e9 / 2)  # a step reads the weights once (copy = 2 passes)
    results["floor"] = {"copy_bandwidth_gbs": bw, "itl_floor_s": floor_s}
    ratios = {
        "stream_vs_hf_fp32_batch1": http["stream_tok_s"] / hf["float32_batch1_tok_s"],
        "base32_vs_hf_fp32_batch32": http["base32_tok_s"] / hf[f"float32_batch{args.requests}_tok_s"],
        "lora32_vs_base32": http["lora32_tok_s"] / http["base32_tok_s"],
        "stream_itl_over_floor": http["stream_itl_p50_s"] / floor_s,
    }
    results["ratios"] = ratios
    print(
        f"one stream {http['stream_tok_s']:.1f} tok/s, ITL p50 {http['stream_itl_p50_s'] * 1e3:.1f} ms "
        f"(floor {floor_s * 1e3:.1f} ms) = {ratios['stream_vs_hf_fp32_batch1']:.2f}x plain fp32 batch 1",
        flush=True,
    )
    print(
        f"32 concurrent {http['base32_tok_s']:.1f} tok/s = {ratios['base32_vs_hf_fp32_batch32']:.2f}x plain "
        f"fp32 batch 32 | 8 LoRA r8 {http['lora32_tok_s']:.1f} tok/s = {ratios['lora32_vs_base32']:.2f}x",
        flush=True,
    )
    out = Path(__file__).parent / "results" / args.out
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
