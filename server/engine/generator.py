"""Continuous batching: one engine thread steps a running batch while requests come and go.

One ``Generator.step()``:

1. finish cancelled requests (waiting or running) with ``"cancelled"``; they consume no more
   compute from this step on;
2. admit waiting requests strictly FIFO (adapter keys play no part) while the batch has room
   (``max_batch_size``) and the prefill fits ``max_tokens_per_step``;
3. prefill the newcomers as one left-padded batch and sample their first token;
4. run one decode step for the sequences that were already running and sample their next token;
5. stream events, finish sequences on EOS / ``max_new_tokens`` / stop string, drop them from the
   batch at once, and merge the surviving newcomers into the running batch.

One request's failure stays with that request: a row whose scores are NaN / +inf (e.g. its own
adapter's doing), or whose own set-up, sampling, detokenising or stop-string step raises, ends with
``"error"`` (``FinishEvent.error_kind`` says why; ``error_counts`` counts them) and leaves the batch;
the other rows go on with exactly the tokens they would have had. Only a failure of a forward
itself fails every row of that forward (``"batch"``).

Threading: ``submit`` (and ``GenerationRequest.cancel``) may be called from any thread;
``step`` / ``run_forever`` run on a single engine thread, which alone touches the batch and emits
events. ``run_forever`` sleeps on a condition variable while there is nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from server.engine.kv_batch import ForwardFn, RunningBatch, hf_forward  # noqa: F401  (hf_forward: re-export)
from server.engine.requests import (
    ERROR_KINDS,
    ErrorKind,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    IncrementalDetokenizer,
    RetryLater,
    StopStringBuffer,
    TokenEvent,
    TokenizerLike,
)
from server.engine.sampling import make_generator, row_top_logprobs, sample_rows
from server.engine.scoring import NonFinitePrompt, score_prompt

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one ``step()`` did (for metrics)."""

    batch_size: int  # sequences that got a forward this step (prefilled + decoded)
    prefill_tokens: int  # real prompt tokens prefilled (padding excluded)
    decode_tokens: int  # sequences decoded (one token each)
    step_seconds: float
    admitted: int = 0
    finished: int = 0
    num_running: int = 0  # after the step
    num_waiting: int = 0  # after the step
    queue_seconds: list[float] = field(default_factory=list)  # waits of requests admitted for the first time


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one admitted request (satisfies ``kv_batch.BatchSequence``)."""

    request: GenerationRequest
    detok: IncrementalDetokenizer
    text: StopStringBuffer
    rng: torch.Generator | None  # None for greedy requests
    generated: list[int] = field(default_factory=list)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def adapter_key(self) -> Hashable:
        return self.request.adapter_key


class Generator:
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
        if max_batch_size < 1 or max_tokens_per_step < 1:
            raise ValueError("max_batch_size and max_tokens_per_step must be >= 1")
        self.forward = forward
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.cache_factory = cache_factory
        self.idle_wait_s = idle_wait_s
        self._progress = time.monotonic()  # the last finished step, or the last idle moment
        self._step_started: float | None = None  # set while a step runs
        # Run on the engine thread between steps and when woken while idle (e.g. freeing the
        # device memory of deleted adapters).
        self.housekeeping = housekeeping
        self._waiting: deque[GenerationRequest] = deque()
        # Admitted by the caller (``reserve``) and on their way to ``submit`` (adapter loading):
        # counted with the queue, so the bound holds before they reach it.
        self._reserved = 0
        self._cond = threading.Condition()
        self._running: RunningBatch[_Sequence] = self._new_batch()
        self._admit_cap: int | None = None  # lowered after RetryLater, grows back after a prefill
        self._queue_seconds: list[float] = []  # waits of first admissions, reported in StepStats
        # Called with every step's StepStats on the engine thread (metrics subscribe here).
        self.observers: list[Callable[[StepStats], None]] = []
        # Requests ended with "error", by ErrorKind (read by metrics at scrape time).
        self.error_counts: dict[ErrorKind, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._errors_lock = threading.Lock()  # submit may count from any thread

    def _new_batch(self) -> RunningBatch[_Sequence]:
        return RunningBatch(self.forward, self.device, self.cache_factory)

    # ----------------------------------------------------------------------------- public API

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running_adapter_keys(self) -> list[Hashable]:
        """Adapter keys of the running batch (a prefill must leave room for them too)."""
        return self._running.adapter_keys

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_adapter_keys(self) -> list[Hashable]:
        """Adapter keys of the queued requests (any thread)."""
        with self._cond:
            return [r.adapter_key for r in self._waiting]

    def stalled_for(self) -> float:
        """Seconds the engine has had work but finished no step (0 while idle or progressing)."""
        started = self._step_started
        if started is not None:
            return max(0.0, time.monotonic() - started)
        if not self._has_work():
            return 0.0
        return max(0.0, time.monotonic() - self._progress)

    @property
    def num_queued(self) -> int:
        """Waiting requests plus those reserved and not yet submitted (the bound ``reserve`` keeps)."""
        with self._cond:
            return len(self._waiting) + self._reserved

    def reserve(self, limit: int) -> int | None:
        """Hold a place in the queue for a request about to be submitted, if fewer than ``limit``
        are queued or reserved; returns None when it holds one, else the count (the queue is full).

        Check and count happen under the queue's lock, so concurrent callers never overshoot and
        a reserved request is never counted twice (``submit(..., reserved=True)`` turns it into a
        waiting one in the same critical section; ``unreserve`` gives the place back)."""
        with self._cond:
            n = len(self._waiting) + self._reserved
            if n >= limit:
                return n
            self._reserved += 1
            return None

    def unreserve(self) -> None:
        with self._cond:
            self._reserved -= 1

    def submit(self, request: GenerationRequest, reserved: bool = False) -> None:
        """Queue ``request`` (thread-safe). Impossible requests finish at once with ``"error"``.
        ``reserved``: it holds a place taken with ``reserve``, which it now uses (or gives back)."""
        self.submit_many([request], reserved)

    def submit_many(self, requests: list[GenerationRequest], reserved: bool = False) -> None:
        """``submit`` for several requests, queued next to each other in one critical section, so
        that one admission takes them together (room permitting) and prefills a shared prompt once."""
        fit = []
        for request in requests:
            n = len(request.prompt_token_ids)
            room = 0 if request.params.max_new_tokens == 0 else 1  # scoring alone may fill the context
            msg = self.too_long(n, room)
            if msg is not None:
                if reserved:
                    self.unreserve()
                self._reject(request, "invalid", msg)
            else:
                fit.append(request)
        if not fit:
            return
        with self._cond:
            if reserved:
                self._reserved -= len(fit)
            self._waiting.extend(fit)
            self._cond.notify()

    def _has_work(self) -> bool:
        return bool(self._waiting) or self.num_running > 0

    def too_long(self, n: int, room: int) -> str | None:
        """Why a prompt of ``n`` tokens (plus ``room`` for a first token) can never run, or None."""
        if self.max_seq_len is not None and n + room > self.max_seq_len:
            return f"prompt has {n} tokens; the maximum sequence length is {self.max_seq_len}"
        return None

    def wake(self) -> None:
        """Wake ``run_forever`` (e.g. right after setting its stop event)."""
        with self._cond:
            self._cond.notify_all()

    def run_forever(self, stop_event: threading.Event) -> None:
        """Step until ``stop_event`` is set; sleep on a condition while idle. Aborts leftovers on exit."""
        while not stop_event.is_set():
            with self._cond:
                while not self._has_work() and not stop_event.is_set():
                    self._cond.wait(timeout=self.idle_wait_s)
                    self._progress = time.monotonic()
                    self._housekeeping()
            if stop_event.is_set():
                break
            try:
                self.step()
            except Exception as exc:  # a bug, not a model error: fail the batch, keep serving
                log.exception("generator step failed")
                self._fail_running(exc)
        self.abort_all("generator stopped")

    def _housekeeping(self) -> None:
        """Idle work (freeing forgotten adapters); a failure is logged, never kills the thread."""
        if self.housekeeping is None:
            return
        try:
            self.housekeeping()
        except Exception:
            log.exception("engine housekeeping failed")

    def abort_all(self, message: str) -> None:
        """Finish every waiting and running request with ``"error"`` (engine thread, or engine stopped)."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            self._reject(req, "aborted", message)
        self._fail_running(RuntimeError(message), "aborted")

    def _fail_running(self, exc: BaseException, kind: ErrorKind | None = None) -> int:
        """Fail every running sequence and start from an empty batch."""
        n = self._fail(list(self._running.seqs), exc, kind)
        self._running = self._new_batch()
        return n

    def step(self) -> StepStats:
        """One scheduling iteration (engine thread only)."""
        self._step_started = time.monotonic()
        try:
            return self._step()
        finally:
            self._step_started = None
            self._progress = time.monotonic()

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
            queue_seconds=self._queue_seconds,
        )
        self._queue_seconds = []
        for observe in self.observers:
            observe(stats)
        return stats

    # ------------------------------------------------------------------------------ internals

    def _drop_cancelled_waiting(self) -> int:
        with self._cond:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for req in cancelled:
            req.emit(FinishEvent("cancelled", "", len(req.prompt_token_ids), 0))
        return len(cancelled)

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

    def _start(self, req: GenerationRequest) -> _Sequence:
        p = req.params
        rng = None if p.greedy else make_generator(p.seed, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        return _Sequence(request=req, detok=detok, text=StopStringBuffer(p.stop), rng=rng)

    def _start_all(self, admitted: list[GenerationRequest]) -> list[_Sequence]:
        """The sequences of ``admitted``; a request whose own set-up raises ends alone."""
        seqs = []
        for req in admitted:
            try:
                seqs.append(self._start(req))
            except Exception as exc:
                log.exception("starting request %s failed", req.id)
                self._reject(req, "request", f"set-up failed: {type(exc).__name__}: {exc}")
        return seqs

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

    def _score_one(self, seq: _Sequence, row_logits: torch.Tensor | None) -> bool:
        """Send ``seq`` its ``PromptEvent`` if it asked (from its prompt's logits ``[T, V]``); end it
        when it only scores or its scoring fails. Returns whether it goes on to generate."""
        params = seq.request.params
        if params.prompt_logprobs is not None:
            assert row_logits is not None
            try:
                seq.request.emit(score_prompt(row_logits, seq.prompt_token_ids, params.prompt_logprobs))
            except NonFinitePrompt as exc:
                self._finish(seq, "error", str(exc), "non_finite")
                return False
            except Exception as exc:
                log.exception("scoring the prompt of request %s failed", seq.request.id)
                self._finish(seq, "error", f"prompt scoring failed: {type(exc).__name__}: {exc}", "request")
                return False
        if params.max_new_tokens == 0:
            self._finish(seq, "length")
            return False
        return True

    def _sample_and_emit(self, batch: RunningBatch[_Sequence], logits: torch.Tensor) -> int:
        """Sample a token per row of ``batch``, stream it, drop finished rows; return how many finished.

        A row ends with ``"error"`` on its own when its scores are unusable (any NaN or +inf, or no
        finite entry; ``-inf`` alone is a masked token) or when its sampling or text step raises."""
        n = len(batch.seqs)
        keep, token_ids = self._sample_seqs(batch.seqs, logits)
        batch.set_next_tokens(token_ids)
        batch.filter(keep)
        return n - len(keep)

    def _sample_seqs(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Sample, stream and advance each of ``seqs`` (row ``i`` of ``logits`` ``[B, V]``); returns
        the indices of the sequences that go on and the sampled ids ``[B]`` (on the device)."""
        usable = (logits < float("inf")).all(dim=-1) & (logits > float("-inf")).any(dim=-1)  # [B]
        params, rngs = [s.request.params for s in seqs], [s.rng for s in seqs]
        out, failed = sample_rows(logits, params, rngs, self.device)
        tokens = torch.where(usable, out.token_ids, -1).tolist()  # host sync; -1 = unusable
        logprobs = out.logprobs.tolist() if out.logprobs is not None else [None] * len(seqs)
        tops = [None] * len(seqs)  # alternatives only when some row asked (SampleOutput.top)
        if out.top is not None:
            tops = row_top_logprobs(out.top, [p.top_logprobs if p.logprobs else 0 for p in params])
        keep = []
        for i, (seq, tok, lp, top) in enumerate(zip(seqs, tokens, logprobs, tops, strict=True)):
            if tok < 0:
                message = f"non-finite logits (NaN or inf) at generated token {len(seq.generated) + 1}"
                self._finish(seq, "error", message, "non_finite")
            elif i in failed:
                log.error("sampling failed for request %s: %s", seq.request.id, failed[i])
                self._finish(seq, "error", f"sampling failed: {failed[i]}", "request")
            elif self._advance_alone(seq, tok, lp, top):
                keep.append(i)
        return keep, out.token_ids

    def _advance_alone(self, seq: _Sequence, token: int, logprob: float | None, top=None) -> bool:
        """``_advance``, but an exception (detokeniser, stop strings, the sink) ends this request only."""
        n = len(seq.generated)
        try:
            return self._advance(seq, token, logprob, top)
        except Exception as exc:
            log.exception("emitting a token of request %s failed", seq.request.id)
            del seq.generated[n:]  # not delivered: completion_tokens counts the token events sent
            with contextlib.suppress(Exception):  # a sink that raises again: the request is over anyway
                self._finish(seq, "error", f"{type(exc).__name__}: {exc}", "request")
            return False

    def _advance(self, seq: _Sequence, token: int, logprob: float | None, top=None) -> bool:
        """Record ``token`` for ``seq`` and emit its events; return whether the sequence continues."""
        seq.generated.append(token)
        params = seq.request.params
        reason: FinishReason | None = None
        if token in self.eos_token_ids and not params.ignore_eos:
            reason = "eos"
        elif len(seq.generated) >= params.max_new_tokens:
            reason = "length"
        elif (
            self.max_seq_len is not None
            and len(seq.prompt_token_ids) + len(seq.generated) >= self.max_seq_len
        ):
            reason = "length"
        delta = "" if reason == "eos" else seq.detok.push(token)
        if reason is not None:
            delta += seq.detok.flush()
        text, hit_stop = seq.text.add(delta, final=reason is not None)
        if hit_stop:
            reason = "stop"
        seq.request.emit(TokenEvent(token, text, logprob if params.logprobs else None, top))
        if reason is None:
            return True
        self._finish(seq, reason)
        return False

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        error: str | None = None,
        kind: ErrorKind | None = None,
        retryable: bool = False,
    ) -> None:
        req = seq.request
        if reason == "error":
            self._count_error(req, kind or "batch")
        n_prompt, n_generated = len(req.prompt_token_ids), len(seq.generated)
        req.emit(FinishEvent(reason, seq.text.final_text, n_prompt, n_generated, error, retryable, kind))

    def _reject(self, req: GenerationRequest, kind: ErrorKind, message: str) -> None:
        """End a request that has no sequence (yet) with ``"error"``."""
        self._count_error(req, kind)
        req.emit(FinishEvent("error", "", len(req.prompt_token_ids), 0, message, error_kind=kind))

    def _count_error(self, req: GenerationRequest, kind: ErrorKind) -> None:
        if not req.finished:  # a request ends once; so is it counted
            with self._errors_lock:
                self.error_counts[kind] += 1

    def _fail(self, seqs: list[_Sequence], exc: BaseException, kind: ErrorKind | None = None) -> int:
        """Finish the still-unfinished ``seqs`` with ``"error"``; return how many that was."""
        pending = [s for s in seqs if not s.request.finished]
        retryable = isinstance(exc, RetryLater)
        kind = kind or ("no_room" if retryable else "batch")
        for seq in pending:
            self._finish(seq, "error", f"{type(exc).__name__}: {exc}", kind, retryable)
        return len(pending)
