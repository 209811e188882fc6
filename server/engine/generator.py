"""Continuous batching over a left-padded ``DynamicCache`` batch (``kv_cache=padded``).

Kept beside the paged cache (``paged/``, the default) for comparison. One ``Generator.step()``:

1. finish cancelled requests (waiting or running) with ``"cancelled"``; they consume no more
   compute from this step on;
2. admit waiting requests strictly FIFO (adapter keys play no part) while the batch has room
   (``max_batch_size``) and the prefill fits ``max_tokens_per_step``;
3. prefill the newcomers as one left-padded batch and sample their first token;
4. run one decode step for the sequences that were already running and sample their next token;
5. stream events, finish sequences on EOS / ``max_new_tokens`` / stop string, drop them from the
   batch at once, and merge the surviving newcomers into the running batch.

The request side (queue, sampling, streaming, per-request failures) is ``batching.BatchingBase``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable

import torch
from transformers.cache_utils import DynamicCache

from server.engine.batching import BatchingBase, StepStats, _Sequence  # noqa: F401  (re-exports)
from server.engine.kv_batch import ForwardFn, RunningBatch, hf_forward  # noqa: F401  (hf_forward: re-export)
from server.engine.requests import ErrorKind, GenerationRequest, RetryLater, TokenizerLike

log = logging.getLogger(__name__)


class Generator(BatchingBase):
    """Continuous-batching generation over an injected ``forward`` (see ``kv_batch.ForwardFn``).

    ``max_tokens_per_step`` bounds a step's prefill in *padded* tokens (rows × longest prompt),
    which is what the prefill forward computes; a prompt longer than the budget is admitted alone.
    ``max_seq_len`` (optional) rejects longer prompts and ends generation with ``"length"`` when
    prompt + completion reaches it. ``cache_factory`` makes the empty cache of each prefill
    (e.g. ``lambda: DynamicCache(config=model.config)``).
    """

    def __init__(
        self,
        forward: ForwardFn,
        tokenizer: TokenizerLike,
        eos_token_ids: Iterable[int],
        max_batch_size: int = 16,
        max_tokens_per_step: int = 2048,
        device: torch.device | str = "cpu",
        *,
        max_seq_len: int | None = None,
        cache_factory: Callable[[], DynamicCache] = DynamicCache,
        idle_wait_s: float = 0.5,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            eos_token_ids,
            max_batch_size,
            max_tokens_per_step,
            device,
            max_seq_len=max_seq_len,
            idle_wait_s=idle_wait_s,
            housekeeping=housekeeping,
        )
        self.forward = forward
        self.cache_factory = cache_factory
        self._running: RunningBatch[_Sequence] = self._new_batch()

    def _new_batch(self) -> RunningBatch[_Sequence]:
        return RunningBatch(self.forward, self.device, self.cache_factory)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running_adapter_keys(self) -> list[Hashable]:
        """Adapter keys of the running batch (a prefill must leave room for them too)."""
        return self._running.adapter_keys

    def _fail_running(self, exc: BaseException, kind: ErrorKind | None = None) -> int:
        """Fail every running sequence and start from an empty batch."""
        n = self._fail(list(self._running.seqs), exc, kind)
        self._running = self._new_batch()
        return n

    def _step(self) -> StepStats:
        t0 = time.perf_counter()
        finished = self._drop_cancelled()
        admitted = self._admit()

        newcomers = self._new_batch()
        prefill_tokens = sum(len(r.prompt_token_ids) for r in admitted)
        seqs = self._start_all(admitted)
        finished += len(admitted) - len(seqs)
        if seqs:
            try:
                scoring = any(s.request.params.prompt_logprobs is not None for s in seqs)
                if scoring:  # every position's logits only when some row wants its prompt scored
                    logits, full = newcomers.prefill_all(seqs)  # [N, V], [N, T, V]
                else:
                    logits, full = newcomers.prefill(seqs), None  # [N, V]
                if self._admit_cap is not None:  # grow back gradually after a back-off
                    self._admit_cap *= 2
                if scoring or any(s.request.params.max_new_tokens == 0 for s in seqs):
                    logits, done = self._score_prompts(newcomers, logits, full)
                    finished += done
                if len(newcomers):
                    finished += self._sample_and_emit(newcomers, logits)
            except RetryLater as exc:
                newcomers = self._new_batch()
                if len(seqs) == 1 and not len(self._running):
                    finished += self._fail(seqs, exc)  # can never run: fail it, keep serving
                else:  # back to the head of the queue, in order; admit fewer next time
                    with self._cond:
                        self._waiting.extendleft(reversed([s.request for s in seqs]))
                    self._admit_cap = max(1, len(seqs) // 2)
                    admitted, prefill_tokens = [], 0
            except Exception as exc:
                log.exception("prefill failed")
                finished += self._fail(seqs, exc)
                newcomers = self._new_batch()

        decode_tokens = len(self._running)
        if decode_tokens:
            try:
                logits = self._running.decode()  # [B, V]
                finished += self._sample_and_emit(self._running, logits)
            except Exception as exc:
                log.exception("decode failed")
                finished += self._fail(list(self._running.seqs), exc)
                self._running = self._new_batch()

        try:
            self._running.concat(newcomers)
        except Exception as exc:  # e.g. the forward produced caches of different layouts
            log.exception("merging the prefilled batch failed")
            finished += self._fail(self._running.seqs + newcomers.seqs, exc)
            self._running = self._new_batch()
        stats = StepStats(
            batch_size=len(admitted) + decode_tokens,
            prefill_tokens=prefill_tokens,
            decode_tokens=decode_tokens,
            step_seconds=time.perf_counter() - t0,
            admitted=len(admitted),
            finished=finished,
            num_running=len(self._running),
            num_waiting=len(self._waiting),
        )
        return self._publish(stats)

    def _drop_cancelled(self) -> int:
        cancelled = self._drop_cancelled_waiting()
        keep = []
        for i, seq in enumerate(self._running.seqs):
            if seq.request.cancelled:
                self._finish(seq, "cancelled")
            else:
                keep.append(i)
        n_running = len(self._running)
        self._running.filter(keep)
        return cancelled + n_running - len(keep)

    def _admit(self) -> list[GenerationRequest]:
        """Pop waiting requests in arrival order while they fit (batch rows and prefill budget)."""
        room = self.max_batch_size - len(self._running)
        if self._admit_cap is not None:
            room = min(room, self._admit_cap)
        out: list[GenerationRequest] = []
        longest = 0
        with self._cond:
            while self._waiting and len(out) < room:
                n = max(longest, len(self._waiting[0].prompt_token_ids))
                if out and (len(out) + 1) * n > self.max_tokens_per_step:
                    break  # FIFO: never skip ahead to a smaller request
                req = self._waiting.popleft()
                if req.admitted_time is None:  # a request put back after RetryLater counts once
                    req.admitted_time = time.monotonic()
                    self._queue_seconds.append(req.admitted_time - req.arrival_time)
                out.append(req)
                longest = n
        return out

    def _score_prompts(
        self, batch: RunningBatch[_Sequence], logits: torch.Tensor, full: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """After a prefill: send each asking row its ``PromptEvent`` (from ``full`` ``[N, T, V]``),
        end the rows that only score (``max_new_tokens == 0``) and those whose prompt scores are
        unusable or whose scoring raises, each alone. Returns the logits ``[N', V]`` of the rows
        left in ``batch`` and how many ended."""
        keep = [
            i for i, seq in enumerate(batch.seqs) if self._score_one(seq, None if full is None else full[i])
        ]
        ended = len(batch) - len(keep)
        if ended:
            batch.filter(keep)
            logits = logits[keep]
        return logits, ended

    def _sample_and_emit(self, batch: RunningBatch[_Sequence], logits: torch.Tensor) -> int:
        """Sample a token per row of ``batch``, stream it, drop finished rows; return how many finished.

        A row ends with ``"error"`` on its own when its scores are unusable (any NaN or +inf, or no
        finite entry; ``-inf`` alone is a masked token) or when its sampling or text step raises."""
        n = len(batch.seqs)
        keep, token_ids = self._sample_seqs(batch.seqs, logits)
        batch.set_next_tokens(token_ids)
        batch.filter(keep)
        return n - len(keep)
