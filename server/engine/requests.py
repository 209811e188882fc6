"""Requests, sampling parameters, streamed events and the text side of generation.

Threading model: a request is created by its owner (an HTTP handler on the asyncio loop, or a
test), handed to ``Generator.submit`` and from then on only the engine thread calls
``GenerationRequest.emit``. The owner reads events from the request's sink:

* ``AsyncStream`` — for asyncio owners; ``emit`` hops onto the owner's loop with
  ``loop.call_soon_threadsafe`` and the owner does ``async for event in stream``;
* ``BlockingStream`` — a ``queue.Queue``; iterate it from any thread (tests, scripts).

Event invariants (per request): one ``PromptEvent`` first if (and only if) the request asked for
prompt log-probabilities and its prefill succeeded, zero or more ``TokenEvent`` (one per sampled
token, EOS included), then exactly one ``FinishEvent``; nothing is emitted after it. The
``text_delta`` of all token events concatenate to ``FinishEvent.text``.

Text invariants (``StopStringBuffer``): the final text ends *before* the first stop string, and no
delta ever carries characters that later turn out to belong to a stop string (a suffix that is a
prefix of some stop string is held back until it is disambiguated or the request finishes).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "eos", "cancelled", "error"]
# Why a request ended with "error" (a bounded set: it is also a metric label).
#   non_finite - the request's own next-token scores were NaN or inf (e.g. its adapter's weights);
#   request    - one of the request's own steps raised (set-up, sampling, detokenising, stop strings);
#   batch      - a forward shared with other requests failed (every row of it ends);
#   no_room    - the engine can never fit it (``RetryLater`` with nothing else running);
#   aborted    - the engine stopped; invalid - refused at submit (e.g. a prompt over the context).
ErrorKind = Literal["non_finite", "request", "batch", "no_room", "aborted", "invalid"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("non_finite", "request", "batch", "no_room", "aborted", "invalid")
# A positive temperature below this is greedy: dividing float32 logits by it overflows (a temperature
# of 1e-45 made every score inf/NaN and always picked token 0). vLLM draws the same line.
GREEDY_BELOW = 1e-5
MAX_INT64 = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI's and vLLM's cap)


@dataclass
class SamplingParams:
    """Per-request decoding settings (validated on construction).

    ``temperature == 0`` means greedy (argmax), and so does any temperature below ``GREEDY_BELOW``
    (it is set to 0); ``top_k == 0`` disables top-k; ``top_p == 1`` disables nucleus filtering.
    ``seed`` makes sampling reproducible for the same prompt no matter what else shares the batch.
    ``logprobs`` asks for the log-probability of each chosen token under the model's raw
    distribution (before temperature / top-k / top-p / ``logit_bias``), and ``top_logprobs`` (with
    ``logprobs``) for that many best alternatives per token. ``prompt_logprobs`` (``None`` = off) asks for the
    log-probabilities of the prompt's own tokens, plus that many best alternatives per position,
    computed in the prefill (a ``PromptEvent``). ``max_new_tokens == 0`` scores without generating:
    the request finishes right after its prefill with ``"length"``.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    ignore_eos: bool = False  # keep generating past EOS (benchmarks need fixed-length outputs)
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its score

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError("max_new_tokens must be an int")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        self.temperature = float(self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        top_k = self.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_INT64:
            raise ValueError(f"top_k must be an int in [0, 2**63 - 1] (0 = off), got {self.top_k!r}")
        self.top_p = float(self.top_p)
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_INT64:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if isinstance(self.stop, str) or not isinstance(self.stop, Sequence):
            raise TypeError("stop must be a list of strings")
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.logprobs = bool(self.logprobs)
        for name in ("top_logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is None and name == "prompt_logprobs":
                continue
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be an int in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
        self.logit_bias = {int(t): float(b) for t, b in dict(self.logit_bias).items()}
        if not all(t >= 0 and math.isfinite(b) for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias needs token ids >= 0 and finite biases")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------------------- events


class RetryLater(RuntimeError):
    """Raised by a forward when a step cannot run *yet* (e.g. no device room for its adapters).

    The generator puts the newcomers back at the head of the queue and admits fewer next time.
    """


# (token id, log-probability) of the best alternatives at one position, best first.
TopLogprobs = tuple[tuple[int, float], ...]
# What a log-probability of -inf is reported as (JSON has no infinity; vLLM's convention).
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token. ``text_delta`` may be empty (text held back or incomplete UTF-8)."""

    token_id: int
    text_delta: str
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None  # with params.logprobs and top_logprobs > 0


@dataclass(frozen=True)
class PromptEvent:
    """The prompt's own log-probabilities, emitted right after the prefill (before any token) to
    requests with ``params.prompt_logprobs`` set. Entry ``j`` is about prompt token ``j`` given the
    tokens before it, so entry 0 (nothing before it) is ``None`` in both lists."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[TopLogprobs | None, ...] | None  # None when prompt_logprobs == 0


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request. ``text`` is the whole completion (stop string excluded)."""

    finish_reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    retryable: bool = False  # the error was a lack of room (RetryLater): the same request may work later
    error_kind: ErrorKind | None = None  # why, when finish_reason is "error"


Event = TokenEvent | PromptEvent | FinishEvent


class EventSink(Protocol):
    def emit(self, event: Event) -> None:
        """Called from the engine thread; must not block and must be thread-safe."""


class BlockingStream:
    """Thread-safe sink read by blocking iteration (tests, scripts)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Event] = queue.Queue()

    def emit(self, event: Event) -> None:
        self._queue.put(event)

    def get(self, timeout: float | None = None) -> Event:
        """Next event; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)

    def drain(self) -> list[Event]:
        """Every event available right now, without blocking."""
        out: list[Event] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def __iter__(self) -> Iterator[Event]:
        """Yield events until (and including) the ``FinishEvent``; blocks while none is available."""
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


class AsyncStream:
    """Sink for an asyncio owner. Create it on (or with) the owner's loop; iterate with ``async for``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the owner's loop is closed: nobody is listening any more
            pass

    async def get(self) -> Event:
        return await self._queue.get()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()


@dataclass(kw_only=True, eq=False)
class GenerationRequest:
    """One generation job. ``adapter_key`` is opaque to the engine (hashable; ``None`` = base model).

    ``cancel()`` may be called from any thread; the engine finishes the request with reason
    ``"cancelled"`` at the start of its next step. ``emit`` is called by the engine thread only and
    drops anything after the first ``FinishEvent``.
    """

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter_key: Hashable | None = None
    sink: EventSink = field(default_factory=BlockingStream)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = field(default=None, repr=False)  # set by the generator
    _cancel_flag: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _finished: bool = field(default=False, init=False, repr=False)
    # Called once, after the FinishEvent is delivered (the engine releases the adapter version here).
    on_finish: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        hash(self.adapter_key)  # fail early on an unhashable key

    def cancel(self) -> None:
        self._cancel_flag.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel_flag.is_set()

    @property
    def finished(self) -> bool:
        return self._finished

    def emit(self, event: Event) -> None:
        if self._finished:
            return
        if isinstance(event, FinishEvent):
            self._finished = True
        self.sink.emit(event)
        if isinstance(event, FinishEvent):
            for callback in self.on_finish:
                callback()


# ----------------------------------------------------------------------------------------- text


class TokenizerLike(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turn a growing token list into text deltas, robust to multi-token characters.

    Prefix-window decoding (as in vLLM / TGI): decode ``ids[prefix_offset:read_offset]`` and
    ``ids[prefix_offset:]``; the delta is the difference, emitted only when the new text grew and
    does not end in U+FFFD (an incomplete UTF-8 sequence or a SentencePiece byte run still being
    built). A few prompt tokens seed the window so that context-dependent decoding (leading spaces)
    is right for the first generated token. Windows stay a few tokens long, so each call is O(1)
    in the length of the sequence.
    """

    def __init__(self, tokenizer: TokenizerLike, prompt_token_ids: Sequence[int], context: int = 5) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-context:]) if context > 0 else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), computed lazily

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly ``""``)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids)
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            return delta
        return ""

    def flush(self) -> str:
        """Text still pending (e.g. a trailing incomplete character, as U+FFFD) at the end of a sequence."""
        prefix_text = self._prefix_text if self._prefix_text is not None else self._decode(self._ids)
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return delta


class StopStringBuffer:
    """Accumulate decoded text, cut it at the first stop string, and decide what is safe to stream.

    Invariant: ``text[:emitted]`` has been streamed; no stop string starts before ``emitted``
    (anything that could start one was held back), so searching from ``emitted`` is enough.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0

    def add(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Append ``delta``; return ``(text safe to stream now, hit_stop)``.

        On a stop hit the text is truncated before the stop string and everything up to it is
        released. With ``final`` (the sequence ends for another reason) nothing is held back.
        """
        self.text += delta
        cut = -1
        for s in self._stop:
            i = self.text.find(s, self.emitted)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(cut), True
        if final:
            return self._release(len(self.text)), False
        return self._release(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest pending suffix that is a proper prefix of some stop string."""
        pending = len(self.text) - self.emitted
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, pending), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    @property
    def final_text(self) -> str:
        return self.text[: self.emitted]
