"""Decode steps with static shapes: bucketed batch sizes, static buffers, optionally compiled.

A paged step that only decodes (every row one token, no prefill chunk) and touches no adapter
(binding ``None``: base-model rows only) can run with a fixed set of shapes:

* the batch is padded up to a **bucket** (1, 2, 4, 8, ... up to ``max_batch_size``); a padding
  row feeds token 0 at position 0, writes its key/value into the cache's one scratch slot
  (``PagedKV.scratch_slot``, never part of a block) and attends to that slot alone, so it can
  neither read nor overwrite a sequence's KV;
* the rows' key lists are padded to a multiple of ``key_multiple`` (masked out), so the key
  length changes once every ``key_multiple`` steps rather than every step;
* ``input_ids``, ``position_ids`` and the write slots of each bucket live in buffers allocated
  once and refilled in place.

That is the form a CUDA graph capture needs (fixed shapes and addresses per bucket) and what
``torch.compile`` on CPU needs to build one graph per bucket. ``compile=True`` compiles the
model's forward for this path only (inductor; the key length is marked dynamic, so each bucket
compiles once). Inside the compiled graph the paged attention reads its layout from the
``facet_static`` keyword argument (transformers passes unknown keyword arguments down to the
attention function) instead of the thread's context variable, and ``AdaptedLinear`` is the plain
base linear: which is exactly right here, because only base-only steps come this way.

Measured on the 2-core build machine (docs/engine.md, "Static decode shapes and torch.compile",
``bench/static_decode.py``): compiled is faster for base-only steps at small batches and costs
minutes of start-up, so ``static_decode`` is ``off`` by default; the numbers are recorded there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .attention import PagedKV, StepLayout

log = logging.getLogger("facet.engine")


@dataclass
class StaticLayout:
    """The layout of a static decode step, passed to the attention as ``facet_static``."""

    kv: PagedKV
    write_slots: torch.Tensor  # [Bb]
    slots: torch.Tensor  # [Bb, Lb] keys of each row (padding: the row's first slot / the scratch slot)
    mask: torch.Tensor  # [Bb, 1, 1, Lb] True where a row attends


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


@dataclass
class _Buffers:
    input_ids: torch.Tensor  # [1, Bb]
    position_ids: torch.Tensor  # [1, Bb]
    write_slots: torch.Tensor  # [Bb]


class StaticDecode:
    """Runs eligible decode steps through bucketed, padded shapes (compiled when asked)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv: PagedKV,
        max_batch_size: int,
        device: torch.device,
        compile: bool = False,
        key_multiple: int = 16,
    ):
        self.kv = kv
        self.device = device
        self.buckets = batch_buckets(max_batch_size)
        self.key_multiple = key_multiple
        self.compiled = compile
        self._forward = torch.compile(model.forward, dynamic=False) if compile else model.forward
        self._buffers: dict[int, _Buffers] = {}
        self.compile_seconds: dict[int, float] = {}  # bucket -> seconds of its first (compiling) call
        self.steps: dict[int, int] = {}  # bucket -> steps run through it

    # ---- phase 1: which steps come this way ---------------------------------------------------

    @staticmethod
    def eligible(binding, layout: StepLayout, tokens: int) -> bool:
        """A decode-only step (every packed token a decode row) on the base model alone."""
        return binding is None and not layout.chunks and layout.decodes == tokens

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    # ---- phase 2: pad the step into its bucket --------------------------------------------------

    def _buffers_of(self, bucket: int) -> _Buffers:
        buf = self._buffers.get(bucket)
        if buf is None:
            zeros = dict(dtype=torch.long, device=self.device)
            buf = self._buffers[bucket] = _Buffers(
                torch.zeros(1, bucket, **zeros), torch.zeros(1, bucket, **zeros), torch.zeros(bucket, **zeros)
            )
        return buf

    def pad(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: StepLayout):
        """Inputs of the bucket holding this step's rows (padding rows as the module says)."""
        rows = layout.decodes
        bucket = self.bucket(rows)
        buf = self._buffers_of(bucket)
        scratch = self.kv.scratch_slot
        buf.input_ids.zero_()
        buf.position_ids.zero_()
        buf.write_slots.fill_(scratch)
        buf.input_ids[:, :rows] = input_ids
        buf.position_ids[:, :rows] = position_ids
        buf.write_slots[:rows] = layout.write_slots
        length = layout.decode_slots.shape[1]
        keys = -(-length // self.key_multiple) * self.key_multiple
        slots = torch.full((bucket, keys), scratch, dtype=torch.long, device=self.device)
        slots[:rows, :length] = layout.decode_slots
        slots[:rows, length:] = layout.decode_slots[:, :1]  # written slots, masked out below
        mask = torch.zeros(bucket, 1, 1, keys, dtype=torch.bool, device=self.device)
        if layout.decode_mask is None:
            mask[:rows, ..., :length] = True
        else:
            mask[:rows, ..., :length] = layout.decode_mask
        mask[rows:, ..., 0] = True  # a padding row attends to the scratch slot only
        return buf, StaticLayout(self.kv, buf.write_slots, slots, mask)

    # ---- phase 3: run -------------------------------------------------------------------------

    def run(self, input_ids, position_ids, layout: StepLayout, logits_index: torch.Tensor) -> torch.Tensor:
        """Logits ``[K, V]`` of the rows ``logits_index`` names, like the packed forward's."""
        buf, static = self.pad(input_ids, position_ids, layout)
        if self.compiled:  # one graph per bucket, whatever the key length
            torch._dynamo.mark_dynamic(static.slots, 1)
            torch._dynamo.mark_dynamic(static.mask, 3)
        bucket = buf.input_ids.shape[1]
        first = bucket not in self.compile_seconds
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self._forward(
                input_ids=buf.input_ids, position_ids=buf.position_ids, use_cache=False, facet_static=static
            )
        self.steps[bucket] = self.steps.get(bucket, 0) + 1
        if first:
            self.compile_seconds[bucket] = time.perf_counter() - t0
            if self.compiled:
                log.info("decode bucket %d compiled in %.1f s", bucket, self.compile_seconds[bucket])
        return out.logits[0].index_select(0, logits_index)

    def warm_up(self) -> None:
        """Compile every bucket now (start-up), so no request waits for a compilation."""
        if not self.compiled:
            return
        for bucket in self.buckets:
            slots = torch.full((bucket, self.key_multiple), self.kv.scratch_slot, device=self.device)
            layout = StepLayout(
                self.kv, slots[:, 0].contiguous(), decodes=bucket, decode_slots=slots, decode_mask=None
            )
            ids = torch.zeros(1, bucket, dtype=torch.long, device=self.device)
            self.run(ids, ids.clone(), layout, torch.zeros(1, dtype=torch.long, device=self.device))
