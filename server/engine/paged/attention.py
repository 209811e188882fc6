"""Paged attention over packed, unpadded tokens, plugged into Hugging Face models.

A paged step feeds the model ``input_ids`` ``[1, T]``: the new tokens of every scheduled sequence,
back to back (decode rows one token each, prefill chunks several), with explicit position ids.
The model computes q/k/v and rotary embeddings as usual and calls its attention function, which
Facet registers under the name ``facet_paged`` (``install``). With a ``StepLayout`` bound to the
calling thread (``paged_step``) that function:

1. writes every new token's key and value into its slot of the layer's block storage
   (``PagedKV``: ``[H_kv, num_blocks * block_size, D]`` per layer, head-major, so a gather of
   slots is already in the ``[H_kv, L, D]`` order attention reads; slot = block * size + offset);
2. attends each sequence's queries to its own tokens only, read through its block table:
   decode rows together (one batched attention over their gathered keys, masked to each row's
   length), each prefill chunk alone (its queries see the cached context plus the chunk, causally).

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
        # One slot past the blocks: where padding rows of a static decode step (``static.py``)
        # write and read. No block contains it, so no sequence ever sees what lands there.
        self.scratch_slot = slots
        # Uninitialised: a slot is read only after it was written (a step writes its tokens before
        # any read, decode rows are padded with their own first slot), so the cache's pages are
        # touched as sequences fill them, not all at start-up.
        # Head-major: measured here (bf16, per layer, keys in 16-slot blocks), the decode attention
        # of 32 rows x 500 keys, gather included, takes 11.7 ms (1 thread) / 7.9 ms (2 threads)
        # slot-major ([slots, H_kv, D]: the gathered keys need a transposing copy for the matmuls)
        # and 3.4 / 2.7 ms head-major.
        self.keys = [
            torch.empty(kv_heads, slots + 1, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.values = [
            torch.empty(kv_heads, slots + 1, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
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
    decodes: int = 0  # decode rows: packed positions 0 … decodes - 1, one token each
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
    ``([1, T, H, D], None)`` like transformers' attention functions. A static decode step
    (``static.py``) passes its layout as the ``facet_static`` keyword instead: a compiled graph
    cannot read a context variable."""
    static = kwargs.get("facet_static")
    if static is not None:
        return static_decode(module, query, key, value, static, scaling)
    layout = _STEP.get()
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if getattr(module, "sliding_window", None) or kwargs.get("softcap"):
        raise NotImplementedError("paged attention does not support sliding windows or soft-capping")
    k_store, v_store = layout.kv.keys[module.layer_idx], layout.kv.values[module.layer_idx]
    # Phase 1: write the step's keys/values into their slots ([H_kv, T, D] into [H_kv, slots, D]).
    write_kv(k_store, v_store, layout.write_slots, key, value)
    # Phase 2: each sequence attends to its own slots. Decode rows are packed first.
    q = query[0]  # [H, T, D]
    nd = layout.decodes
    if nd:
        od = decode_rows(q[:, :nd], k_store, v_store, layout.decode_slots, layout.decode_mask, scaling)
        if nd == q.shape[1]:  # a decode-only step
            return od.unsqueeze(0), None
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, H, D]
    if nd:
        out[:nd] = od
    gqa = q.shape[0] != k_store.shape[0]
    for c in layout.chunks:
        kc = k_store.index_select(1, c.slots).to(q.dtype)  # [H_kv, ctx + n, D]
        vc = v_store.index_select(1, c.slots).to(q.dtype)
        if c.context and small_chunk(c.length, c.context + c.length, q.shape[0]):  # few queries
            out[c.start : c.start + c.length] = chunk_attention(
                q[:, c.start : c.start + c.length], kc, vc, c.context, scaling
            )
            continue
        qc = q[:, c.start : c.start + c.length].unsqueeze(0)  # [1, H, n, D]
        kc, vc = kc.unsqueeze(0), vc.unsqueeze(0)
        if c.context == 0:
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            mask = causal_after(c.context, c.length, q.device)
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[c.start : c.start + c.length] = oc[0].transpose(0, 1)
    return out.unsqueeze(0), None


def causal_after(context: int, n: int, device) -> torch.Tensor:
    """``[n, context + n]``, True where a chunk's query ``i`` (absolute position ``context + i``)
    attends: keys ``0 … context + i``."""
    cols = torch.arange(context + n, device=device)
    return cols[None, :] <= torch.arange(n, device=device)[:, None] + context


def write_kv(k_store, v_store, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write a step's keys/values (``[1, H_kv, T, D]``) into their ``slots`` of a layer."""
    k_store.index_copy_(1, slots, key[0].to(k_store.dtype))
    v_store.index_copy_(1, slots, value[0].to(v_store.dtype))


def decode_rows(q, k_store, v_store, slots: torch.Tensor, mask, scaling) -> torch.Tensor:
    """Decode rows' attention: ``q`` ``[H, B, D]`` (one query per row), ``slots`` ``[B, L]`` the
    keys of each row, ``mask`` ``[B, 1, 1, L]`` or None. Returns ``[B, H, D]``."""
    rows, length = slots.shape
    flat = slots.reshape(-1)
    kd = k_store.index_select(1, flat).view(k_store.shape[0], rows, length, -1)  # [H_kv, B, L, D]
    vd = v_store.index_select(1, flat).view(v_store.shape[0], rows, length, -1)
    return decode_attention(q.transpose(0, 1), kd.to(q.dtype), vd.to(q.dtype), mask, scaling)


def static_decode(module, query, key, value, static, scaling):
    """A static decode step: write each row's key/value, then one batched decode attention."""
    k_store, v_store = static.kv.keys[module.layer_idx], static.kv.values[module.layer_idx]
    write_kv(k_store, v_store, static.write_slots, key, value)
    return decode_rows(query[0], k_store, v_store, static.slots, static.mask, scaling).unsqueeze(0), None


# When a chunk after a cached context attends through ``chunk_attention`` rather than SDPA: up to
# 8 queries, or while its float32 scores (H x n x L) stay within about 1 MiB (cache-resident).
# Measured (bf16, per layer, SmolLM2's 9 query / 3 KV heads, keys in 16-slot blocks; SDPA /
# chunk_attention, ms, 1 thread): 500 keys: n=4 0.23/0.18, n=16 0.45/0.32, n=32 0.73/0.59;
# 2,000 keys: n=4 0.79/0.38, n=8 1.06/0.56, n=16 1.54/2.06; 4,000 keys: n=2 1.53/0.49,
# n=4 1.57/0.67, n=8 2.09/1.16, n=16 3.07/5.38 (2 threads alike: 4,000 keys n=4 1.00/0.49).
SMALL_CHUNK = 8
SMALL_SCORES = 1 << 18  # float32 scores


def small_chunk(n: int, length: int, heads: int) -> bool:
    return n <= SMALL_CHUNK or n * length * heads <= SMALL_SCORES


def chunk_attention(q, k, v, context: int, scale):
    """A short chunk's queries over its cached context and its own earlier tokens.

    ``q`` ``[H, n, D]``; ``k``/``v`` ``[H_kv, context + n, D]`` in position order. Returns
    ``[n, H, D]``. The decode attention's two matmuls and float32 softmax, the query heads of a KV
    head stacked into one matmul: for a few queries against thousands of keys that is about twice
    as fast as torch's CPU SDPA (whose kernel tiles the queries in blocks far taller than the
    chunk); for longer chunks SDPA wins (``small_chunk``)."""
    h, n, d = q.shape
    hk, length = k.shape[0], k.shape[1]
    g = h // hk
    q = q * (d**-0.5 if scale is None else scale)
    scores = torch.matmul(q.reshape(hk, g * n, d), k.transpose(1, 2))  # [H_kv, g·n, L]
    scores = scores.view(hk, g, n, length).masked_fill_(~causal_after(context, n, q.device), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs.view(hk, g * n, length), v)  # [H_kv, g·n, D]
    return out.view(h, n, d).transpose(0, 1)


def decode_attention(q, k, v, mask, scale):
    """One query per row: ``q`` ``[B, H, D]``, ``k``/``v`` ``[H_kv, B, L, D]``, ``mask``
    ``[B, 1, 1, L]`` (True = attend) or None. Returns ``[B, H, D]``.

    Two batched matmuls (batched over KV head and row, the query heads of a KV head stacked) and a
    float32 softmax, the numerics of transformers' eager attention. Measured on this machine
    (``docs/engine.md``): for a single query per row, torch's CPU SDPA kernel is 2x slower in
    float32 and ~14x slower in bfloat16 than this (batch 32, 500 keys); a lone bfloat16 row is
    faster still in float32 (small matmuls)."""
    b, h, d = q.shape
    hk, length = k.shape[0], k.shape[2]
    if b == 1 and q.dtype != torch.float32:  # one row: float32 math is the faster here (and exact)
        return decode_attention(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    g = h // hk  # query heads per KV head: q head kv * g + j reads KV head kv
    q = q * (d**-0.5 if scale is None else scale)  # scaling the query: [B, H, D] is the small side
    scores = torch.matmul(q.view(b, hk, g, d).transpose(0, 1), k.transpose(-1, -2))  # [H_kv, B, g, L]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(1, b, 1, length), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, h, d)


def paged_mask(*args, **kwargs):
    """No mask inside a paged step (the layout says who sees what); SDPA's mask outside one. A
    compiled graph is always a static decode step (``static.py``), which needs no mask either."""
    if torch.compiler.is_compiling() or _STEP.get() is not None:
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
