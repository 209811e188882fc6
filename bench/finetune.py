"""Fine-tune each adapter family on the Zorblish task (data/zorblish) with its default config.

For every family, on the resident base model (default: the offline SmolLM2-135M-Instruct), train
with the family's default config and learning rate (``server.jobs.train``) for a bounded wall
time / step count, and report trainable parameters, wall time, tokens/s (every token forwarded),
held-out loss before and after, and on held-out prompts (greedy replies) the share that is
exactly right and the share that follows the taught format (one word, "zo" + ... + "k", three
letters longer than the source word), before and after; and each family's tokens/s relative to
LoRA (rank 8) measured in the same run.

    .venv/bin/python bench/finetune.py [--families lora hut ...] [--budget-s 300] [--max-steps 300]
    .venv/bin/python bench/finetune.py --quick          # one family, a few steps: a smoke test
    .venv/bin/python bench/finetune.py --families surm-ldr --out bench/results/finetune-surm-ldr.json

A name in ``--families`` is a family (trained with its default config) or one of ``CONFIGS``
(a family with a non-default config, e.g. a variant the default does not reach).

Writes bench/results/finetune.json (``--out`` to change; ``--quick`` writes finetune-quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine.adapted_linear import TrainBinding, bind  # noqa: E402
from server.engine.loader import BaseModel, load_base_model  # noqa: E402
from server.jobs.data import IGNORE_INDEX, Example, read_jsonl, tokenize_records  # noqa: E402
from server.jobs.train import Hyperparameters, train_adapter  # noqa: E402
from server.methods import Adapter, available_methods  # noqa: E402
from server.settings import Settings  # noqa: E402

DATA = ROOT / "data" / "zorblish"
# The config fields shown in the results (LoRA's config also lists every PEFT flag, all off).
KEY_FIELDS = {
    "lora": ("r", "lora_alpha", "use_rslora"),
    "hut": ("r", "use_scale_shift"),
    "ether": ("variant", "side", "n_blocks"),
    "dct": ("n_frequency", "scaling", "delta", "n_bands"),
    "surm": ("variant", "alpha", "kron_factor", "ldr_rank"),
}
# Named runs of a family with another config: (family, method config, learning rate or None for
# the family's default).
CONFIGS = {
    # The paper's W(G, H) with r = 4 (its Llama run). Each ΔW entry sums r·N products, so Adam's
    # per-parameter steps move it far more than the circulant's one product: SURM's default 1e-2
    # diverges in one step on SmolLM2 (held-out loss 7.0 -> 18.7); 1e-3 and 2e-4 both train.
    "surm-ldr": ("surm", {"variant": "ldr", "ldr_rank": 4}, 1e-3),
}


def load_task() -> tuple[list, list]:
    train, val = DATA / "train.jsonl", DATA / "val.jsonl"
    if not (train.exists() and val.exists()):
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_zorblish", DATA / "make_zorblish.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.write(DATA)
    return read_jsonl(train), read_jsonl(val)


def follows_format(reply: str, target: str) -> bool:
    """The taught answer format: one lowercase word, "zo" + (as many letters as the source) + "k"."""
    return (
        reply.isalpha()
        and reply.islower()
        and reply.startswith("zo")
        and reply.endswith("k")
        and (len(reply) == len(target))
    )


@torch.no_grad()
def reply_shares(
    base: BaseModel, adapter: Adapter | None, examples: list[Example], targets: list[str]
) -> dict:
    """Greedy replies (up to 16 tokens) to held-out prompts: the share exactly right, the share in
    the taught format, and a few samples."""
    binding = None
    if adapter is not None:
        dev = base.device
        params = {p: {n: t.to(dev) for n, t in m.items()} for p, m in adapter.modules.items()}
        binding = TrainBinding(adapter.method, adapter.config, params)
    exact = fmt = 0
    samples = []
    for ex, target in zip(examples, targets, strict=True):
        n_prompt = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
        ids = torch.tensor([ex.input_ids[:n_prompt]], device=base.device)
        with bind(binding):
            out = base.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=base.eos_token_ids or None,
                pad_token_id=base.eos_token_ids[0] if base.eos_token_ids else 0,
            )
        text = base.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
        exact += text == target
        fmt += follows_format(text, target)
        if len(samples) < 5:
            samples.append({"expected": target, "reply": text})
    n = max(len(examples), 1)
    return {"exact": exact / n, "format": fmt / n, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=available_methods())
    ap.add_argument("--budget-s", type=float, default=300.0, help="training wall time per family")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-limit", type=int, default=80, help="held-out examples evaluated")
    ap.add_argument("--em-limit", type=int, default=40, help="held-out examples for exact match (0 = skip)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="lora only, 3 steps, 8 held-out examples")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        given = argv if argv is not None else sys.argv[1:]
        args.families = args.families if "--families" in given else ["lora"]
        args.budget_s, args.max_steps, args.val_limit, args.em_limit = 60.0, 3, 8, 2
    out = args.out or ROOT / "bench" / "results" / ("finetune-quick.json" if args.quick else "finetune.json")

    settings_kw = {"model": args.model} if args.model else {}
    if args.threads:
        settings_kw["threads"] = args.threads
    t0 = time.perf_counter()
    base = load_base_model(Settings(**settings_kw))
    load_s = time.perf_counter() - t0
    train_records, val_records = load_task()
    val_records = val_records[: args.val_limit]
    val = tokenize_records(base.tokenizer, val_records, 512)
    em_examples = val[: args.em_limit]
    em_targets = [r.messages[-1]["content"] for r in val_records[: args.em_limit]]
    em_base = reply_shares(base, None, em_examples, em_targets) if em_examples else None

    results = {
        "model": base.name,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "task": "zorblish (data/zorblish)",
        "train_examples": len(train_records),
        "val_examples": len(val),
        "budget_s": args.budget_s,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "model_load_s": round(load_s, 2),
        "families": {},
    }
    for name in args.families:
        family, method_config, lr = CONFIGS.get(name, (name, {}, None))
        deadline = time.perf_counter() + args.budget_s
        hp = Hyperparameters(
            max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed, learning_rate=lr
        )
        print(f"[{name}] training (<= {args.max_steps} steps, <= {args.budget_s:.0f} s)", file=sys.stderr)
        adapter, history = train_adapter(
            base,
            family,
            method_config,
            None,
            train_records,
            val,
            hp,
            should_stop=lambda deadline=deadline: time.perf_counter() > deadline,
            eval_when_stopped=True,  # the budget ends training: the held-out loss after is the point
        )
        cfg = adapter.config.model_dump(mode="json")
        steps = len(history.steps)
        train_s = history.steps[-1]["elapsed_s"] if steps else 0.0
        row = {
            "config": {k: v for k, v in cfg.items() if k in KEY_FIELDS.get(family, cfg)},
            "learning_rate": history.learning_rate,
            "trainable_params": history.trainable_params,
            "steps": steps,
            "stopped_by_budget": history.stopped,
            "train_wall_s": round(train_s, 2),
            "total_wall_s": round(history.wall_s, 2),
            "tokens_per_s": round(history.tokens_seen / train_s, 1) if train_s else None,
            "train_loss_first": history.steps[0]["loss"] if steps else None,
            "train_loss_last": history.final_loss,
            "val_loss_before": history.val[0]["loss"],
            "val_loss_after": history.val[-1]["loss"],
        }
        if em_examples:
            after = reply_shares(base, adapter, em_examples, em_targets)
            row |= {
                "exact_match_before": em_base["exact"],
                "exact_match_after": after["exact"],
                "format_share_before": em_base["format"],
                "format_share_after": after["format"],
                "samples_after": after["samples"],
            }
        results["families"][name] = row
        print(f"[{name}] {json.dumps(row)}", file=sys.stderr)
    lora_tps = results["families"].get("lora", {}).get("tokens_per_s")
    for row in results["families"].values():
        tps = row["tokens_per_s"]
        row["tokens_per_s_vs_lora"] = round(tps / lora_tps, 2) if tps and lora_tps else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {out}")
    return 0


def print_table(results: dict) -> None:
    head = ("family", "params", "steps", "train s", "tok/s", "vs LoRA", "val loss", "drop", "exact", "format")
    print(" | ".join(head))
    for family, r in results["families"].items():
        drop = 1 - r["val_loss_after"] / r["val_loss_before"]
        cells = (
            family,
            f"{r['trainable_params']:,}",
            str(r["steps"]),
            f"{r['train_wall_s']:.0f}",
            f"{r['tokens_per_s']}",
            f"{r['tokens_per_s_vs_lora']}",
            f"{r['val_loss_before']:.2f} -> {r['val_loss_after']:.2f}",
            f"{drop:.0%}",
            f"{r.get('exact_match_before', 0):.0%} -> {r.get('exact_match_after', 0):.0%}",
            f"{r.get('format_share_before', 0):.0%} -> {r.get('format_share_after', 0):.0%}",
        )
        print(" | ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
