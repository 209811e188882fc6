"""Shared fixtures: tiny random-weight Llama models and an in-memory tokenizer (no network, no files)."""

from __future__ import annotations

import pytest
import torch


def make_tokenizer(vocab_size: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0")


def make_tiny_llama(seed: int = 0, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama(), make_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, saying so, where there is none (``bench/gpu.sh``
    runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
