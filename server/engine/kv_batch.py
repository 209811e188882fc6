"""A left-padded running batch over a transformers ``DynamicCache``.

Invariants of a non-empty ``RunningBatch`` with ``B`` rows and cache length ``L``:

* ``seqs[i]`` is row ``i`` of every tensor below and of every cache layer;
* every cache layer is a plain ``DynamicLayer`` (or ``GrowingLayer``) with ``keys``/``values``
  ``[B, H, L, D]``;
* ``attention_mask`` is ``[B, L]`` (int64) and describes the cache columns: each row is
  ``0 … 0 1 … 1`` (left padding only, never holes), so the number of real tokens of row ``i``
  is ``attention_mask[i].sum()`` and that is also the position id of its next token;
* at least one row has a real token in column 0 (``filter`` trims all-padding columns);
* ``next_tokens`` ``[B]`` holds the last sampled token of each row, *not yet* in the cache; it is
  fed by the next ``decode``.

Padding never changes results: padded key columns are masked out for every query, and explicit
``position_ids`` (``cumsum(mask) - 1``) give every real token the position it would have alone.

Rows of one prefill with the same prompt and adapter key (``n`` samples of a prompt, or a repeated
prompt) run through the model once; their cache rows and logits are copies of that one row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

# forward(input_ids [B, T], attention_mask [B, L_past + T], position_ids [B, T], past_key_values,
#         adapter_keys: one per row) -> logits [B, T', V]; it must append the T new positions to
# ``past_key_values`` in place. Only the last position is read, so T' may be 1 (logits_to_keep=1);
# ``prefill_all`` calls it with the keyword ``all_positions=True`` and needs every position (T' = T).
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache, list[Hashable]], torch.Tensor]


def hf_forward(model: torch.nn.Module) -> ForwardFn:
    """The plain forward for a Hugging Face causal LM (adapter keys ignored).

    Asks the model for the last position's logits only (``logits_to_keep=1``) when it supports
    that: the generator never reads the others, and ``[B, T, V]`` logits of a long prefill are big.
    Only a prefill with a row that wants its prompt's log-probabilities passes ``all_positions``.
    """
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def forward(
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, L_past + T]
        position_ids: torch.Tensor,  # [B, T]
        past_key_values: DynamicCache,
        adapter_keys: list[Hashable],
        all_positions: bool = False,
    ) -> torch.Tensor:  # [B, T, V]
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
            **({} if all_positions else extra),
        )
        return out.logits

    return forward


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values sit in buffers with spare columns.

    ``DynamicLayer.update`` concatenates, copying the whole cache of the layer at every decode
    step (``aten::cat`` was ~15% of a batch-32 fp32 step on SmolLM2). Here a step writes its new
    column in place; the buffer grows by half its length (at least ``GROW``) when full, so copies
    are amortised. ``keys``/``values`` read as views of the filled columns (last dim contiguous)
    and assigning them (``RunningBatch.filter`` / ``concat``) adopts the tensor as a full buffer.
    """

    GROW = 64

    def __init__(self):
        self._kbuf = self._vbuf = None
        self._klen = self._vlen = 0  # filled columns (set apart: filter/concat assign one, then the other)
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._kbuf is None else self._kbuf[:, :, : self._klen]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._kbuf, self._klen = t, _columns(t)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._vbuf is None else self._vbuf[:, :, : self._vlen]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._vbuf, self._vlen = t, _columns(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self._klen, key_states.shape[-2]
        if self._vlen != n:
            raise RuntimeError(f"cache layer holds {n} key columns but {self._vlen} value columns")
        full = self._kbuf is None or self._kbuf.dim() != 4 or self._vbuf is None or self._vbuf.dim() != 4
        if full or min(self._kbuf.shape[-2], self._vbuf.shape[-2]) < n + new:
            cap = n + new + max(self.GROW, n // 2)
            self._kbuf = self._grow(self._kbuf, key_states, n, cap)
            self._vbuf = self._grow(self._vbuf, value_states, n, cap)
        self._kbuf[:, :, n : n + new] = key_states
        self._vbuf[:, :, n : n + new] = value_states
        self._klen = self._vlen = n + new
        return self.keys, self.values

    @staticmethod
    def _grow(buf: torch.Tensor | None, like: torch.Tensor, n: int, cap: int) -> torch.Tensor:
        b, h, _, d = like.shape
        out = like.new_empty(b, h, cap, d)
        if n:
            out[:, :, :n] = buf[:, :, :n]
        return out


def _columns(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.dim() < 3 else t.shape[-2]


def growing_cache(config) -> DynamicCache:
    """``DynamicCache(config=config)`` with its plain full-attention layers as ``GrowingLayer``."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class BatchSequence(Protocol):
    """What the batch needs to know about a sequence; everything else is the caller's business."""

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def adapter_key(self) -> Hashable: ...


S = TypeVar("S", bound=BatchSequence)


class UnsupportedCacheError(TypeError):
    """The model produced a cache this batch cannot pad, merge and slice."""


class RunningBatch(Generic[S]):
    """Rows of sequences sharing one ``DynamicCache``. See the module docstring for invariants."""

    def __init__(
        self,
        forward: ForwardFn,
        device: torch.device | str = "cpu",
        cache_factory: Callable[[], DynamicCache] = DynamicCache,
        pad_token_id: int = 0,
    ) -> None:
        self.forward = forward
        self.device = torch.device(device)
        self.cache_factory = cache_factory
        self.pad_token_id = pad_token_id
        self.seqs: list[S] = []
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, L]
        self.next_tokens: torch.Tensor | None = None  # [B] int64

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def seq_len(self) -> int:
        """``L``: number of cache columns (padding included)."""
        return self.attention_mask.shape[1]

    @property
    def adapter_keys(self) -> list[Hashable]:
        return [s.adapter_key for s in self.seqs]

    # ------------------------------------------------------------------------------ model calls

    def prefill(self, seqs: Sequence[S]) -> torch.Tensor:
        """Run the prompts of ``seqs`` (into this empty batch); return last-position logits ``[B, V]``."""
        return self._prefill(seqs, all_positions=False)[:, -1, :]

    def prefill_all(self, seqs: Sequence[S]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prefill``, also returning the logits of every position ``[B, T, V]`` (left-padded like
        the prompts: row ``i``'s prompt occupies the last ``len(prompt)`` positions)."""
        logits = self._prefill(seqs, all_positions=True)
        return logits[:, -1, :], logits

    @torch.inference_mode()
    def _prefill(self, seqs: Sequence[S], all_positions: bool) -> torch.Tensor:
        if self.seqs:
            raise RuntimeError("prefill needs an empty batch; prefill a new one and concat it")
        if not seqs:
            raise ValueError("nothing to prefill")
        unique, copies = _distinct_prompts(seqs)
        lengths = [len(s.prompt_token_ids) for s in unique]
        t = max(lengths)
        input_ids = torch.full((len(unique), t), self.pad_token_id, dtype=torch.long)  # [U, T]
        mask = torch.zeros(len(unique), t, dtype=torch.long)  # [U, T]
        for i, (s, n) in enumerate(zip(unique, lengths, strict=True)):
            input_ids[i, t - n :] = torch.tensor(s.prompt_token_ids, dtype=torch.long)
            mask[i, t - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [U, T]; padding gets 0 (masked anyway)
        cache = self.cache_factory()
        keys = [s.adapter_key for s in unique]
        extra = {"all_positions": True} if all_positions else {}
        logits = self.forward(input_ids, mask, position_ids, cache, keys, **extra)  # [U, T', V]
        _check_cache(cache, batch=len(unique), length=t)
        if all_positions and logits.shape[1] != t:
            raise RuntimeError(f"the forward returned {logits.shape[1]} positions of {t} (all_positions)")
        if copies is not None:  # rows of one prompt: copies of its one computed row
            idx = copies.to(self.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            mask, logits = mask.index_select(0, idx), logits.index_select(0, idx)
            _check_cache(cache, batch=len(seqs), length=t)
        self.seqs, self.cache, self.attention_mask, self.next_tokens = list(seqs), cache, mask, None
        return logits

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """Feed ``next_tokens`` (one per row); return the next-token logits ``[B, V]``."""
        if not self.seqs or self.next_tokens is None or self.cache is None:
            raise RuntimeError("decode needs a prefilled batch with next_tokens set")
        b = len(self.seqs)
        position_ids = self.attention_mask.sum(-1, keepdim=True)  # [B, 1]: real tokens so far
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(b, 1)], dim=1)  # [B, L+1]
        input_ids = self.next_tokens.view(b, 1)  # [B, 1]
        logits = self.forward(input_ids, mask, position_ids, self.cache, self.adapter_keys)  # [B, 1, V]
        _check_cache(self.cache, batch=b, length=mask.shape[1])
        self.attention_mask, self.next_tokens = mask, None
        return logits[:, -1, :]

    def set_next_tokens(self, tokens: torch.Tensor) -> None:
        """Record the token sampled for each row (``[B]``); the next ``decode`` feeds it."""
        if tokens.shape != (len(self.seqs),):
            raise ValueError(f"expected {len(self.seqs)} tokens, got shape {tuple(tokens.shape)}")
        self.next_tokens = tokens.to(device=self.device, dtype=torch.long)

    # ---------------------------------------------------------------------------- reshaping

    @torch.inference_mode()
    def concat(self, other: RunningBatch[S]) -> None:
        """Append the rows of ``other`` (which is left empty). Both need ``next_tokens`` set."""
        if not other.seqs:
            return
        if not self.seqs:
            self._take(other)
            return
        if self.next_tokens is None or other.next_tokens is None:
            raise RuntimeError("concat needs next_tokens set on both batches")
        assert self.cache is not None and other.cache is not None
        if len(self.cache.layers) != len(other.cache.layers):
            raise UnsupportedCacheError("cannot concat caches with different numbers of layers")
        length = max(self.seq_len, other.seq_len)
        pad_a, pad_b = length - self.seq_len, length - other.seq_len
        for la, lb in zip(self.cache.layers, other.cache.layers, strict=True):
            # [B, H, L, D]: pad spec is (D_left, D_right, L_left, L_right)
            la.keys = torch.cat([F.pad(la.keys, (0, 0, pad_a, 0)), F.pad(lb.keys, (0, 0, pad_b, 0))], dim=0)
            la.values = torch.cat(
                [F.pad(la.values, (0, 0, pad_a, 0)), F.pad(lb.values, (0, 0, pad_b, 0))], dim=0
            )
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (pad_a, 0)), F.pad(other.attention_mask, (pad_b, 0))], dim=0
        )
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.seqs = self.seqs + other.seqs
        other._clear()

    @torch.inference_mode()
    def filter(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order); drop cache columns that became all padding."""
        keep = list(keep)
        if len(keep) == len(self.seqs) and keep == list(range(len(self.seqs))):
            return
        if not keep:
            self._clear()
            return
        assert self.cache is not None
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.attention_mask[idx]  # [B', L]
        first = int(mask.any(dim=0).long().argmax())  # first column some row uses
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:, :]
            layer.values = layer.values[idx, :, first:, :]
        self.attention_mask = mask[:, first:]
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens[idx]
        self.seqs = [self.seqs[i] for i in keep]

    def _take(self, other: RunningBatch[S]) -> None:
        self.seqs, self.cache = other.seqs, other.cache
        self.attention_mask, self.next_tokens = other.attention_mask, other.next_tokens
        other._clear()

    def _clear(self) -> None:
        self.seqs, self.cache, self.next_tokens = [], None, None
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)


def _distinct_prompts(seqs: Sequence[S]) -> tuple[list[S], torch.Tensor | None]:
    """The first row of each distinct (prompt, adapter key), and for every row the index of its
    distinct row (None when all rows differ). The key includes the adapter version, so rows share
    a prefill only when their KV is the same function of the same tokens."""
    first: dict[tuple, int] = {}
    unique: list[S] = []
    index = []
    for s in seqs:
        key = (s.adapter_key, tuple(s.prompt_token_ids))
        if key not in first:
            first[key] = len(unique)
            unique.append(s)
        index.append(first[key])
    if len(unique) == len(seqs):
        return unique, None
    return unique, torch.tensor(index, dtype=torch.long)


def _check_cache(cache: object, batch: int, length: int) -> None:
    """Raise ``UnsupportedCacheError`` unless ``cache`` is a DynamicCache of plain, full KV layers."""
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(
            f"RunningBatch needs a transformers DynamicCache, got {type(cache).__name__}"
        )
    if not cache.layers:
        raise UnsupportedCacheError("the forward did not write anything into the cache (use_cache=True?)")
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, GrowingLayer):
            raise UnsupportedCacheError(
                f"cache layer {i} is {type(layer).__name__}; RunningBatch only supports plain "
                "DynamicLayer KV layers (no sliding-window, quantised, linear-attention or shared layers)"
            )
        keys = layer.keys
        if not layer.is_initialized or keys is None or keys.dim() != 4:
            raise UnsupportedCacheError(f"cache layer {i} holds no [B, H, L, D] keys after the forward")
        if keys.shape[0] != batch or keys.shape[2] != length or layer.values.shape[:3] != keys.shape[:3]:
            raise UnsupportedCacheError(
                f"cache layer {i} has keys {tuple(keys.shape)}, expected [{batch}, H, {length}, D]"
            )
