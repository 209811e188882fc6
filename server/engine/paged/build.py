"""Build the paged KV cache and its generator for a loaded base model (or say why not)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable

import torch

from server.settings import Settings

from . import attention
from .attention import PagedKV, StepLayout, paged_step
from .blocks import BlockPool
from .static import StaticDecode

log = logging.getLogger(__name__)


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the paged cache cannot serve ``model`` (None: it can)."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        return f"the model has {sorted(types)} layers (only full attention is paged)"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    return None


def probe(model: torch.nn.Module, kv: PagedKV, device: torch.device) -> str | None:
    """Run two tokens through the model in a paged step and check that every layer went through the
    paged attention (a model that computes attention its own way would silently ignore the cache)."""
    layers = kv_geometry(model.config)[0]
    calls = []
    original = attention.paged_attention

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return original(module, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(attention.NAME, counting)
    try:
        slots = torch.arange(2, device=device)
        layout = StepLayout(kv, slots, chunks=[attention.Chunk(0, 2, 0, slots)])
        with torch.inference_mode(), paged_step(layout):
            model(
                input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                position_ids=torch.arange(2, device=device)[None],
                use_cache=False,
            )
    finally:
        AttentionInterface.register(attention.NAME, original)
    if sorted(set(calls)) != list(range(layers)):
        return f"its attention bypasses the paged attention ({len(calls)} calls for {layers} layers)"
    return None


def build_kv(
    model: torch.nn.Module, settings: Settings, device: torch.device
) -> tuple[PagedKV, BlockPool] | None:
    """The KV storage and block pool sized by ``settings.kv_cache_bytes``, or None (logged) when the
    model cannot use them (the engine then serves it with the padded cache)."""
    reason = unsupported_reason(model)
    dtype = next(model.parameters()).dtype
    layers, kv_heads, head_dim = kv_geometry(model.config)
    per_token = PagedKV.bytes_per_token(layers, kv_heads, head_dim, dtype)
    bs = settings.kv_block_size
    num_blocks = settings.kv_cache_bytes // (per_token * bs)
    if reason is None and num_blocks < 1:
        reason = (
            f"kv_cache_bytes={settings.kv_cache_bytes} holds no block of {bs} tokens ({per_token} bytes each)"
        )
    if reason is not None:
        log.warning("paged KV cache off (%s): serving with the padded cache", reason)
        return None
    previous = model.config._attn_implementation
    attention.install(model)
    kv = PagedKV(layers, num_blocks, bs, kv_heads, head_dim, dtype, device)
    reason = probe(model, kv, device)
    if reason is not None:
        model.config._attn_implementation = previous
        log.warning("paged KV cache off (%s): serving with the padded cache", reason)
        return None
    return kv, BlockPool(num_blocks, bs, prefix_caching=settings.prefix_caching)


def paged_forward(model: torch.nn.Module, planner, bind, static: StaticDecode | None = None):
    """The ``PagedForward`` of the engine: plan the step's adapters per token, then run the model
    (a base-only decode step through ``static``'s bucketed shapes when there is one)."""
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(input_ids, position_ids, token_keys: list[Hashable], logits_index, layout, also_resident):
        binding = planner.plan(token_keys, 1, also_resident=also_resident)
        if static is not None and static.eligible(binding, layout, input_ids.shape[1]):
            return static.run(input_ids, position_ids, layout, logits_index)
        extra = {"logits_to_keep": logits_index} if keeps else {}
        with torch.inference_mode(), bind(binding), paged_step(layout):
            logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits[0]
        return logits if keeps else logits.index_select(0, logits_index)  # [K, V]

    return forward
