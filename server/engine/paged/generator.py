"""Continuous batching over a paged KV cache: packed tokens, chunked prefill, a prefix cache.

``PagedGenerator`` adds the paged step to the request side of ``batching.BatchingBase`` (queue,
admission bound, sampling, streaming, stop strings, per-request failures). One ``step()``:

1. drop cancelled requests and the prefix-cache entries of forgotten adapter versions;
2. schedule, within ``max_tokens_per_step`` tokens: every running decode row (1 token), then the
   unfinished prefills (a chunk each, as the budget allows; while rows decode, the prefill tokens
   are also capped by ``pacing.ChunkPacer`` so the step stays within ``prefill_itl_factor``
   decode steps), then newcomers FIFO, preempted
   sequences first (their first chunk starts after the blocks the prefix cache already holds);
   a decode row that finds no free block preempts the most recently admitted sequence;
3. run one forward over the packed tokens (``packing.pack``);
4. score prompts, sample a token for every sequence whose tokens are now all computed, stream,
   and release the blocks of finished sequences.

Prefills therefore share steps with decoding rows: a long prompt no longer stalls running streams
for its whole length, only for its chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from server.engine.batching import BatchingBase, StepStats, _Sequence
from server.engine.requests import ErrorKind, GenerationRequest, RetryLater

from .attention import PagedKV, StepLayout
from .blocks import BlockPool
from .pacing import ChunkPacer, StepAllowance
from .packing import SeqKV, Work, pack, register_full_blocks, tokens_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVStats:
    bytes_in_use: int  # blocks held by sequences (cached-only blocks are reusable, not counted)
    capacity_bytes: int
    cached_blocks: int  # blocks registered in the prefix cache
    hit_blocks: int  # prompt blocks found in the prefix cache, since start
    queried_blocks: int  # prompt blocks looked up, since start
    preemptions: int

    @property
    def usage(self) -> float:
        return self.bytes_in_use / self.capacity_bytes if self.capacity_bytes else 0.0


# forward_paged(input_ids [1, T], position_ids [1, T], token_keys [T], logits_index [K], layout,
#               also_resident) -> logits [K, V]
PagedForward = Callable[
    [torch.Tensor, torch.Tensor, list[Hashable], torch.Tensor, StepLayout, list[Hashable]], torch.Tensor
]


class PagedGenerator(BatchingBase):
    """The paged step over ``kv`` (the block storage) and ``pool`` (its bookkeeping).

    ``forward_paged`` runs one packed step (see ``PagedForward``; the engine's plans the step's
    adapters per token first). ``kv_budget_bytes`` is only named in refusals.
    ``prefill_itl_factor``, ``prefill_max_share``, ``prefill_itl_floor_s``: see ``pacing.ChunkPacer``
    (factor 0 = no pacing). The other keyword arguments are ``BatchingBase``'s.
    """

    def __init__(
        self,
        forward_paged: PagedForward,
        tokenizer,
        eos_token_ids,
        *,
        kv: PagedKV,
        pool: BlockPool,
        kv_budget_bytes: int | None = None,
        prefill_itl_factor: float = 0.0,
        prefill_max_share: int = 1,
        prefill_itl_floor_s: float = 0.0,
        **kwargs,
    ):
        super().__init__(tokenizer, eos_token_ids, **kwargs)
        self.forward = forward_paged
        self.kv, self.pool = kv, pool
        self.kv_budget_bytes = kv_budget_bytes
        self._seqs: list[_Sequence] = []  # running, in admission order (the last is preempted first)
        self._preempted: deque[_Sequence] = deque()  # admitted once, waiting to run again
        self._state: dict[_Sequence, SeqKV] = {}
        self._forget: set[Hashable] = set()
        self._forget_lock = threading.Lock()
        self.preemptions = 0
        self.pacer = ChunkPacer(prefill_itl_factor, max_share=prefill_max_share, floor_s=prefill_itl_floor_s)

    # ------------------------------------------------------------------------------ public API

    @property
    def num_running(self) -> int:
        return len(self._seqs)

    @property
    def running_adapter_keys(self) -> list[Hashable]:
        return [s.adapter_key for s in self._seqs]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._preempted)

    @property
    def waiting_adapter_keys(self) -> list[Hashable]:
        return [s.adapter_key for s in list(self._preempted)] + super().waiting_adapter_keys

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def forget_prefix(self, adapter_key: Hashable) -> None:
        """Never match cached blocks of ``adapter_key`` again (any thread; applied before the next step)."""
        with self._forget_lock:
            self._forget.add(adapter_key)
        self.wake()

    def _has_work(self) -> bool:
        return bool(self._waiting) or bool(self._preempted) or bool(self._seqs)

    def too_long(self, n: int, room: int) -> str | None:
        msg = super().too_long(n, room)
        if msg is None and n + room > self.capacity_tokens:
            budget = f" (kv_cache_bytes={self.kv_budget_bytes})" if self.kv_budget_bytes else ""
            msg = f"prompt has {n} tokens; the KV cache holds at most {self.capacity_tokens} tokens{budget}"
        return msg

    # ------------------------------------------------------------------------------ the step

    def _step(self) -> StepStats:
        t0 = time.perf_counter()
        self._apply_forgets()
        finished = self._drop_cancelled()
        work, newcomers, registered = self._schedule()
        try:
            logits, packed = self._forward(work, newcomers, registered)
        except Exception as exc:
            finished += self._fail_work(work, registered, exc)
            work, logits, packed = [], None, None
        prefill = sum(w.n for w in work if not (w.n == 1 and w.state.computed > 0))
        decode = len(work) - sum(1 for w in work if not (w.n == 1 and w.state.computed > 0))
        if work:
            finished += self._after_forward(work, logits, packed)
        stats = StepStats(
            batch_size=len(work),
            prefill_tokens=prefill,
            decode_tokens=decode,
            step_seconds=time.perf_counter() - t0,
            admitted=len(newcomers),
            finished=finished,
            num_running=len(self._seqs),
            num_waiting=self.num_waiting,
        )
        return self._publish(stats)

    # ---- phase 1: housekeeping -----------------------------------------------------------

    def _apply_forgets(self) -> None:
        with self._forget_lock:
            keys, self._forget = self._forget, set()
        for key in keys:
            self.pool.forget(key)

    def _drop_cancelled(self) -> int:
        n = self._drop_cancelled_waiting()
        for seq in [s for s in (*self._seqs, *self._preempted) if s.request.cancelled]:
            self._finish(seq, "cancelled")
            self._end(seq)
            n += 1
        return n

    # ---- phase 2: scheduling --------------------------------------------------------------

    def _schedule(self) -> tuple[list[Work], list[_Sequence], list[int]]:
        """This step's work (decode rows, unfinished prefills, newcomers), the newcomers, and the
        blocks registered in the prefix cache while scheduling (undone if the forward fails)."""
        budget = self.max_tokens_per_step
        work: list[Work] = []
        registered: list[int] = []
        for seq in list(self._seqs):  # decode rows: each needs one slot, preempting if it must
            st = self._state[seq]
            if seq not in self._seqs or self._total(seq) - st.computed != 1 or self._scoring(seq, st):
                continue  # preempted by an earlier row, or still prefilling (a scored prompt's
                # last token is prefill: its logits belong to the prompt's scores)
            if self._grow_or_preempt(seq, st, st.computed + 1, work):
                work.append(Work(seq, st, 1))
                budget -= 1
        budget = max(budget, 0)
        prompts = self.num_waiting + len(self._seqs) - len(work)  # work: this step's decode rows
        allowance = self.pacer.allowance(bool(work), prompts)  # running streams keep their pace
        for seq in list(self._seqs):  # unfinished prefills, as far as budget and blocks allow
            st = self._state[seq]
            need = self._total(seq) - st.computed
            if budget > 0 and (need > 1 or (need == 1 and self._scoring(seq, st))):
                n = self._grow_upto(st, min(budget, allowance.limit(need, st.computed)))
                if n > 0:
                    allowance.spend(n, st.computed)
                    work.append(Work(seq, st, n, logits_all=self._scoring(seq, st)))
                    budget -= n
        for w in work:  # before admitting: a newcomer with the same prefix may read these blocks
            registered += register_full_blocks(self.pool, w.seq, w.state, w.state.computed + w.n)
        newcomers = self._admit_paged(budget, allowance, work, registered)
        if not work and self._seqs:  # every running prefill is out of blocks: make room
            self._preempt(self._seqs[-1], work)
        return work, newcomers, registered

    def _admit_paged(
        self, budget: int, allowance: StepAllowance, work: list[Work], registered: list[int]
    ) -> list[_Sequence]:
        """Newcomers FIFO (preempted ones first) while rows, budget, the pacing allowance and
        blocks allow."""
        room = self.max_batch_size - len(self._seqs)
        if self._admit_cap is not None:
            room = min(room, self._admit_cap)
        out: list[_Sequence] = []
        while budget > 0 and len(out) < room:
            seq = self._next_newcomer()
            if seq is None:
                break
            st = self._state.setdefault(seq, SeqKV())
            if st.computed == 0 and not self._scoring(seq, st):
                self._match_prefix(seq, st)
            n = min(budget, allowance.limit(self._total(seq) - st.computed, st.computed))
            n = self._grow_upto(st, n) if n > 0 else 0
            if n <= 0:  # no block or no allowance left: back to the head of the line
                self._reset(st)
                self._preempted.appendleft(seq)
                break
            allowance.spend(n, st.computed)
            self._seqs.append(seq)
            work.append(Work(seq, st, n, logits_all=self._scoring(seq, st)))
            # register now: a later newcomer of this step with the same prefix reads these blocks
            # (all writes of a layer precede its reads)
            registered += register_full_blocks(self.pool, seq, st, st.computed + n)
            out.append(seq)
            budget -= n
        return out

    def _next_newcomer(self) -> _Sequence | None:
        if self._preempted:
            return self._preempted.popleft()
        with self._cond:
            if not self._waiting:
                return None
            req: GenerationRequest = self._waiting.popleft()
        if req.admitted_time is None:
            req.admitted_time = time.monotonic()
            self._queue_seconds.append(req.admitted_time - req.arrival_time)
        seqs = self._start_all([req])
        return seqs[0] if seqs else self._next_newcomer()

    def _match_prefix(self, seq: _Sequence, st: SeqKV) -> None:
        bs = self.pool.block_size
        max_blocks = (self._total(seq) - 1) // bs  # leave a token to compute: its logits sample
        toks = tokens_of(seq.prompt_token_ids, seq.generated, 0, max_blocks * bs)
        blocks, uid = self.pool.match(seq.adapter_key, toks, max_blocks)
        st.blocks, st.registered, st.chain_uid, st.computed = blocks, len(blocks), uid, len(blocks) * bs

    def _grow_upto(self, st: SeqKV, n: int) -> int:
        """Allocate blocks for up to ``n`` more tokens without preempting; returns how many fit."""
        bs = self.pool.block_size
        n = min(n, (len(st.blocks) + self.pool.num_available) * bs - st.computed)
        if n > 0:
            more = self.pool.blocks_for(st.computed + n) - len(st.blocks)
            if more > 0:
                st.blocks += self.pool.allocate(more)
        return max(n, 0)

    def _grow_or_preempt(self, seq: _Sequence, st: SeqKV, upto: int, work: list[Work]) -> bool:
        """Blocks for ``upto`` tokens, preempting the latest admitted sequences if needed; False if
        ``seq`` itself had to go (preempted, or ended alone when even the whole cache is too small)."""
        more = self.pool.blocks_for(upto) - len(st.blocks)
        while more > 0 and self.pool.num_available < more:
            victim = self._seqs[-1]
            if victim is seq and len(self._seqs) == 1:
                log.warning(
                    "request %s fills the whole KV cache (%d tokens): ended", seq.request.id, upto - 1
                )
                self._finish(seq, "length")
                self._end(seq)
                return False
            self._preempt(victim, work)
            if victim is seq:
                return False
        if more > 0:
            st.blocks += self.pool.allocate(more)
        return True

    def _preempt(self, seq: _Sequence, work: list[Work]) -> None:
        """Free ``seq``'s blocks and queue it to be recomputed (it keeps its tokens and sampler)."""
        self._seqs.remove(seq)
        work[:] = [w for w in work if w.seq is not seq]
        self._reset(self._state[seq])
        self._preempted.appendleft(seq)
        self.preemptions += 1

    def _reset(self, st: SeqKV) -> None:
        self.pool.release(st.blocks)
        st.blocks, st.computed, st.registered, st.chain_uid, st.prompt_logits = [], 0, 0, None, []

    # ---- phase 3: the forward -------------------------------------------------------------

    def _forward(self, work: list[Work], newcomers: list[_Sequence], registered: list[int]):
        """Run the step; if the newcomers' adapters do not fit beside the running ones
        (``RetryLater``), put the newcomers back and run the others."""
        if not work:
            return None, None
        try:
            return self._run(work)
        except RetryLater:
            if not newcomers or (len(newcomers) == 1 and len(work) == 1):
                raise  # nothing to leave out, or it can never run: it fails alone
        fresh = {id(s) for s in newcomers}
        for seq in reversed(newcomers):
            st = self._state[seq]
            self.pool.unregister([b for b in st.blocks if b in registered])
            self._seqs.remove(seq)
            self._reset(st)
            self._preempted.appendleft(seq)
        work[:] = [w for w in work if id(w.seq) not in fresh]
        self._admit_cap = max(1, len(newcomers) // 2)
        return self._run(work) if work else (None, None)

    def _run(self, work: list[Work]):
        packed = pack(work, self.kv, self.device)
        stepping = {id(w.seq) for w in work}
        others = [s.adapter_key for s in self._seqs if id(s) not in stepping]
        t0 = time.perf_counter()
        logits = self.forward(
            packed.input_ids,
            packed.position_ids,
            packed.token_keys,
            packed.logits_index,
            packed.layout,
            others,
        )
        chunks = [(c.length, c.context) for c in packed.layout.chunks]
        self.pacer.observe(time.perf_counter() - t0, chunks, packed.layout.decodes)
        if self._admit_cap is not None:
            self._admit_cap *= 2
        return logits, packed

    def _fail_work(self, work: list[Work], registered: list[int], exc: BaseException) -> int:
        self.pool.unregister(registered)  # their contents were never computed
        if not isinstance(exc, RetryLater):
            log.error("paged forward failed", exc_info=exc)
        seqs = [w.seq for w in work]
        n = self._fail(seqs, exc)
        for seq in seqs:
            self._end(seq)
        return n

    # ---- phase 4: scoring, sampling, streaming -------------------------------------------

    def _after_forward(self, work: list[Work], logits: torch.Tensor, packed) -> int:
        finished = 0
        sampling: list[tuple[_Sequence, torch.Tensor]] = []
        for w, (r0, nr) in zip(work, packed.rows, strict=True):
            st = w.state
            done = w.samples
            st.computed += w.n
            if w.logits_all:
                st.prompt_logits.append(logits[r0 : r0 + nr])
            if not done:
                continue
            if not st.scored:  # first time the prompt is complete: prompt scores, scoring-only ends
                st.scored = True
                full = torch.cat(st.prompt_logits) if st.prompt_logits else None
                st.prompt_logits = []
                if not self._score_one(w.seq, full):
                    self._end(w.seq)
                    finished += 1
                    continue
            sampling.append((w.seq, logits[r0 + nr - 1]))
        if sampling:
            seqs = [s for s, _ in sampling]
            keep, _ = self._sample_seqs(seqs, torch.stack([r for _, r in sampling]))
            kept = set(keep)
            for i, seq in enumerate(seqs):
                if i not in kept:
                    self._end(seq)
                    finished += 1
        return finished

    # ---- bookkeeping ----------------------------------------------------------------------

    def _total(self, seq: _Sequence) -> int:
        return len(seq.prompt_token_ids) + len(seq.generated)

    def _scoring(self, seq: _Sequence, st: SeqKV) -> bool:
        """Whether this sequence still needs every prompt position's logits."""
        return seq.request.params.prompt_logprobs is not None and not st.scored

    def _end(self, seq: _Sequence) -> None:
        """Forget a finished sequence and release its blocks."""
        if seq in self._seqs:
            self._seqs.remove(seq)
        if seq in self._preempted:
            self._preempted.remove(seq)
        st = self._state.pop(seq, None)
        if st is not None:
            self.pool.release(st.blocks)

    def _fail_running(self, exc: BaseException, kind: ErrorKind | None = None) -> int:
        seqs = [*self._seqs, *self._preempted]
        n = self._fail(seqs, exc, kind)
        for seq in seqs:
            self._end(seq)
        return n

    def kv_stats(self) -> KVStats:
        """A snapshot for metrics (read from the scrape thread: plain ints, no locks needed)."""
        pool = self.pool
        per_block = pool.block_size * self._bytes_per_token()
        return KVStats(
            bytes_in_use=pool.num_in_use * per_block,
            capacity_bytes=pool.num_blocks * per_block,
            cached_blocks=pool.num_cached,
            hit_blocks=pool.stats.hit_blocks,
            queried_blocks=pool.stats.queried_blocks,
            preemptions=self.preemptions,
        )

    def kv_bytes_in_use(self) -> int:
        return self.pool.num_in_use * self.pool.block_size * self._bytes_per_token()

    def _bytes_per_token(self) -> int:
        k = self.kv.keys[0]  # [H_kv, slots, D]
        return PagedKV.bytes_per_token(len(self.kv.keys), k.shape[0], k.shape[2], k.dtype)
