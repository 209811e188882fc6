"""The request side of continuous batching, shared by both KV caches' schedulers.

``BatchingBase`` owns what does not depend on how the KV cache is laid out: the bounded queue
(``submit``, ``reserve``), the engine thread's loop (``run_forever``), a request's set-up
(sampler, detokeniser, stop strings), prompt scoring, sampling and streaming a step's tokens, and
ending one request alone (``_finish``, ``_fail``). A subclass owns the running sequences and the
step: ``generator.Generator`` (the left-padded ``DynamicCache`` batch, ``kv_cache=padded``) and
``paged.generator.PagedGenerator`` (KV blocks, the default).

One request's failure stays with that request: a row whose scores are NaN / +inf (e.g. its own
adapter's doing), or whose own set-up, sampling, detokenising or stop-string step raises, ends with
``"error"`` (``FinishEvent.error_kind`` says why; ``error_counts`` counts them); the other rows go
on with exactly the tokens they would have had. Only a failure of a forward itself fails every row
of that forward (``"batch"``).

Threading: ``submit`` (and ``GenerationRequest.cancel``) may be called from any thread; ``step`` /
``run_forever`` run on a single engine thread, which alone touches the running sequences and emits
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
from server.engine.sampling import make_generator, row_top_logprobs, sample_rows, usable_rows
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


class BatchingBase:
    """Queue, engine loop, sampling and streaming of continuous batching (see the module docstring).

    ``max_seq_len`` (optional) rejects longer prompts and ends generation with ``"length"`` when
    prompt + completion reaches it. ``max_tokens_per_step`` is the subclass's step budget.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        eos_token_ids: Iterable[int],
        max_batch_size: int = 16,
        max_tokens_per_step: int = 2048,
        device: torch.device | str = "cpu",
        *,
        max_seq_len: int | None = None,
        idle_wait_s: float = 0.5,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_tokens_per_step < 1:
            raise ValueError("max_batch_size and max_tokens_per_step must be >= 1")
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
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
        self._admit_cap: int | None = None  # lowered after RetryLater, grows back after a prefill
        self._queue_seconds: list[float] = []  # waits of first admissions, reported in StepStats
        # Called with every step's StepStats on the engine thread (metrics subscribe here).
        self.observers: list[Callable[[StepStats], None]] = []
        # Requests ended with "error", by ErrorKind (read by metrics at scrape time).
        self.error_counts: dict[ErrorKind, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._errors_lock = threading.Lock()  # submit may count from any thread

    # ------------------------------------------------------------------ what a subclass provides

    @property
    def num_running(self) -> int:
        raise NotImplementedError

    @property
    def running_adapter_keys(self) -> list[Hashable]:
        """Adapter keys of the running sequences (a prefill must leave room for them too)."""
        raise NotImplementedError

    def _step(self) -> StepStats:
        raise NotImplementedError

    def _fail_running(self, exc: BaseException, kind: ErrorKind | None = None) -> int:
        """Fail every running sequence and start from none; returns how many were failed."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- public API

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

    def step(self) -> StepStats:
        """One scheduling iteration (engine thread only)."""
        self._step_started = time.monotonic()
        try:
            return self._step()
        finally:
            self._step_started = None
            self._progress = time.monotonic()

    def _publish(self, stats: StepStats) -> StepStats:
        """Hand a step's stats, with the queue waits of its first admissions, to the observers."""
        stats.queue_seconds, self._queue_seconds = self._queue_seconds, []
        for observe in self.observers:
            observe(stats)
        return stats

    def _drop_cancelled_waiting(self) -> int:
        with self._cond:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for req in cancelled:
            req.emit(FinishEvent("cancelled", "", len(req.prompt_token_ids), 0))
        return len(cancelled)

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

    def _sample_seqs(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Sample, stream and advance each of ``seqs`` (row ``i`` of ``logits`` ``[B, V]``); returns
        the indices of the sequences that go on and the sampled ids ``[B]`` (on the device)."""
        usable = usable_rows(logits)  # [B]
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
