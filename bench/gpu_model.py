"""A random-weight Llama with a real model's shapes, saved as a Hugging Face folder (``--model``).

The GPU machine cannot download models and the bundled GGUF is too big to carry there, but serving
speed depends on shapes, not on weight values: a random model of SmolLM2-135M's (or Llama-3.2-1B's)
shapes runs the same GEMMs, attention and adapter work. Its tokenizer is word-level over
``t0 … t<V-1>`` (every id decodes), like the tests' tiny model.

    python3 bench/gpu_model.py --shape smollm2-135m --out /tmp/facet-gpu-model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SHAPES = {
    # hidden, layers, heads, kv heads, MLP, vocab, tied embeddings
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True),
}


def build(shape: str, out: Path, device: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv, mlp, vocab, tied = SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=mlp,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(out)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    build(args.shape, args.out, args.device)


if __name__ == "__main__":
    main()
