"""Paged attention over packed, unpadded tokens, plugged into Hugging Face models.

A paged step feeds the model ``input_ids`` ``[1, T]``: the new tokens of every scheduled sequence,
back to back (decode rows one token each, prefill chunks several), with explicit position ids.
The model computes q/k/v and rotary embeddings as usual and calls its attention function, which
Facet registers under the name ``facet_paged`` (``install``). With a ``StepLayout`` bound to the
calling thread (``paged_step``) that function:

1. writes every new token's key and value into its slot of the layer's block storage
   (``PagedKV``: ``[num_blocks * block_size, H_kv, D]`` per layer; slot = block * size + offset);
2. attends each sequence's queries to its own tokens only, read through its block table:
   decode rows together (one batched SDPA over their gathered keys, masked to each row's length),
   each prefill chunk alone (its queries see the cached context plus the chunk, causally).

All writes of a layer happen before any read of that layer, so a sequence may read blocks another
sequence of the same step writes (a shared prefix computed once). Without a bound layout (training,
the padded engine) the function is exactly transformers' SDPA attention, and so is the mask.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "facet_paged"


class PagedKV:
    """The KV storage of every attention layer: one keys and one values tensor per layer."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        slots = num_blocks * block_size
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.keys = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.values = [
            torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass
class Chunk:
    """A prefill chunk: packed positions ``start : start + length``; its keys are ``slots``
    (``[context + length]``: the cached context first, then the chunk's own tokens)."""

    start: int
    length: int
    context: int
    slots: torch.Tensor


@dataclass
class StepLayout:
    """Where one paged forward's tokens go and what each attends to."""

    kv: PagedKV
    write_slots: torch.Tensor  # [T] slot of each packed token
    decode_rows: torch.Tensor | None = None  # [B] packed positions of the decode rows
    decode_slots: torch.Tensor | None = None  # [B, L] keys of each decode row (padded with slot 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where a decode row attends
    chunks: list[Chunk] = field(default_factory=list)


_STEP: ContextVar[StepLayout | None] = ContextVar("facet_paged_step", default=None)


@contextlib.contextmanager
def paged_step(layout: StepLayout):
    token = _STEP.set(layout)
    try:
        yield
    finally:
        _STEP.reset(token)


def paged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``facet_paged``: paged attention inside a bound step, transformers' SDPA outside one.

    ``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, H_kv, T, D]`` (rotary applied). Returns
    ``([1, T, H, D], None)`` like transformers' attention functions."""
    layout = _STEP.get()
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if getattr(module, "sliding_window", None) or kwargs.get("softcap"):
        raise NotImplementedError("paged attention does not support sliding windows or soft-capping")
    k_store, v_store = layout.kv.keys[module.layer_idx], layout.kv.values[module.layer_idx]
    # Phase 1: write the step's keys/values into their slots ([T, H_kv, D]).
    k_store.index_copy_(0, layout.write_slots, key[0].transpose(0, 1).to(k_store.dtype))
    v_store.index_copy_(0, layout.write_slots, value[0].transpose(0, 1).to(v_store.dtype))
    # Phase 2: each sequence attends to its own slots.
    q = query[0]  # [H, T, D]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, H, D]
    gqa = q.shape[0] != k_store.shape[1]
    if layout.decode_rows is not None:
        b, length = layout.decode_slots.shape
        qd = q.index_select(1, layout.decode_rows).transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        flat = layout.decode_slots.reshape(-1)
        kd = (
            k_store.index_select(0, flat).view(b, length, *k_store.shape[1:]).transpose(1, 2)
        )  # [B, H_kv, L, D]
        vd = v_store.index_select(0, flat).view(b, length, *v_store.shape[1:]).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=layout.decode_mask, scale=scaling, enable_gqa=gqa
        )  # [B, H, 1, D]
        out.index_copy_(0, layout.decode_rows, od[:, :, 0, :])
    for c in layout.chunks:
        qc = q[:, c.start : c.start + c.length].unsqueeze(0)  # [1, H, n, D]
        kc = (
            k_store.index_select(0, c.slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        )  # [1, H_kv, ctx + n, D]
        vc = v_store.index_select(0, c.slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        if c.context == 0:
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:  # query i (absolute position context + i) sees keys 0 … context + i
            cols = torch.arange(c.context + c.length, device=q.device)
            rows = torch.arange(c.length, device=q.device)[:, None] + c.context
            mask = cols[None, :] <= rows  # [n, ctx + n]
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[c.start : c.start + c.length] = oc[0].transpose(0, 1)
    return out.unsqueeze(0), None


def paged_mask(*args, **kwargs):
    """No mask inside a paged step (the layout says who sees what); SDPA's mask outside one."""
    if _STEP.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def install(model: torch.nn.Module) -> None:
    """Register ``facet_paged`` and make ``model`` use it (same results as SDPA outside paged steps).

    transformers' modeling utilities are imported here, not at module import: they pull in
    accelerate (and through it boto3), which a server that never loads a model should not pay for."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, paged_attention)
    AttentionMaskInterface.register(NAME, paged_mask)
    model.config._attn_implementation = NAME
