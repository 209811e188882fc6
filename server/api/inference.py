"""Shared by the native and the OpenAI-compatible routes: prompt -> token ids, limits, submit,
and the two ways of reading a request's events (collect all, or stream).

Tokenising and ``engine.submit`` (which may load an adapter from the store) run in worker
threads; the event loop only awaits. A client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import jinja2
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.engine.engine import UnknownAdapter
from server.engine.requests import (
    MAX_INT64,
    AsyncStream,
    FinishEvent,
    GenerationRequest,
    PromptEvent,
    SamplingParams,
    TokenEvent,
)
from server.runtime import Runtime

from .errors import ApiError
from .quotas import Slot

log = logging.getLogger("facet.api")


# ------------------------------------------------------------------------------------ prompts


def _encode(rt: Runtime, text: str) -> list[int]:
    with rt.tokenizer_lock:
        return list(rt.engine.base.tokenizer.encode(text, add_special_tokens=True))


def _render_chat(rt: Runtime, messages: list[dict], add_special_tokens: bool = False) -> list[int]:
    tokenizer = rt.engine.base.tokenizer
    with rt.tokenizer_lock:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


async def chat_ids(
    rt: Runtime, messages: list[dict], where: str, add_special_tokens: bool = False
) -> list[int]:
    """Token ids of chat messages through the model's chat template (422 naming ``where`` when it
    has none or refuses them)."""
    if not getattr(rt.engine.base.tokenizer, "chat_template", None):
        raise ApiError(422, "the base model has no chat template; send a plain prompt", where)
    try:
        return await asyncio.to_thread(_render_chat, rt, messages, add_special_tokens)
    except jinja2.TemplateError as exc:  # raise_exception(...) for e.g. non-alternating roles
        message = str(exc).splitlines()[0][:200] if str(exc) else "invalid messages"
        raise ApiError(422, f"the chat template rejected the messages: {message}", where) from None
    except Exception:  # anything else: logged; the answer names no internal (tokenizer) types
        log.warning("chat rendering failed", exc_info=True)
        raise ApiError(422, "the chat template could not render these messages", where) from None


async def prompt_ids(rt: Runtime, text: str | None, messages: list[dict] | None, where: str) -> list[int]:
    """Token ids of a raw prompt or of chat messages through the model's chat template, within
    the prompt cap and the model's context (422 naming ``where`` otherwise)."""
    if messages is not None:
        ids = await chat_ids(rt, messages, where)
    else:
        ids = await asyncio.to_thread(_encode, rt, text)
    if not ids:
        raise ApiError(422, "the prompt has no tokens", where)
    cap = rt.settings.max_prompt_tokens
    context = rt.engine.generator.max_seq_len
    if len(ids) > cap:
        raise ApiError(
            422, f"the prompt has {len(ids)} tokens; the limit is {cap} (max_prompt_tokens)", where
        )
    if context is not None and len(ids) >= context:
        raise ApiError(
            422, f"the prompt has {len(ids)} tokens; the model's context is {context} tokens", where
        )
    refusal = rt.engine.generator.too_long(len(ids), 1)  # e.g. more than the whole KV cache
    if refusal is not None:
        raise ApiError(422, refusal, where)
    return ids


def sampling_params(
    rt: Runtime,
    *,
    max_new_tokens: int,
    where_max: str,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | list[str] | None,
    logprobs: bool,
    top_logprobs: int = 0,
    prompt_logprobs: int | None = None,
    logit_bias: dict[int, float] | None = None,
) -> SamplingParams:
    cap = rt.settings.max_new_tokens
    if max_new_tokens > cap:
        raise ApiError(422, f"must be <= {cap} (the server's max_new_tokens)", where_max)
    vocab = rt.engine.base.vocab_size
    if top_k > vocab:  # the schema cannot know the model's vocabulary
        raise ApiError(422, f"must be <= {vocab} (the model's vocabulary size; 0 = off)", "body.top_k")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias or {},
        )
    except (TypeError, ValueError) as exc:  # the schemas should have caught it already
        raise ApiError(422, str(exc), "body") from None


def samples(params: SamplingParams, n: int, prompt_scores_once: bool = False) -> list[SamplingParams]:
    """The settings of ``n`` independent samples: sample ``j`` uses ``seed + j``. With
    ``prompt_scores_once`` only sample 0 returns the prompt's scores (the same for every sample)."""
    if params.seed is not None and params.seed + n - 1 > MAX_INT64:
        raise ApiError(422, "seed + n - 1 must be <= 2**63 - 1 (sample j uses seed + j)", "body.seed")
    scores = None if prompt_scores_once else params.prompt_logprobs
    rest = [
        replace(params, seed=None if params.seed is None else params.seed + j, prompt_logprobs=scores)
        for j in range(1, n)
    ]
    return [params, *rest]


# ------------------------------------------------------------------------------------- submit


@dataclass
class Submitted:
    req: GenerationRequest
    stream: AsyncStream
    where_adapter: str = "body.adapter"  # the field that named the adapter ("body.model" on /v1)

    @property
    def adapter(self) -> str | None:
        return None if self.req.adapter_key is None else self.req.adapter_key[0]

    @property
    def adapter_version(self) -> int | None:
        return None if self.req.adapter_key is None else self.req.adapter_key[1]


def _cancel_orphans(slots: list[Slot | None], task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        for req in task.result():
            req.cancel()  # its FinishEvent releases its slot
        return
    for slot in slots:
        if slot is not None:
            slot.release()


async def submit(
    rt: Runtime,
    ids: list[int],
    params: SamplingParams,
    adapter_id: str | None,
    where_adapter: str,
    *,
    key: str | None = None,
) -> Submitted:
    """Admission checks (429: the caller's API ``key`` quota, then the queue), then
    ``engine.submit`` in a thread (it may load the adapter)."""
    return (await submit_many(rt, [(ids, params)], adapter_id, where_adapter, key=key))[0]


def _admit_rows(rt: Runtime, n: int, key: str | None) -> list[Slot | None]:
    """A quota slot (when the caller has a key) and a queue place for each of ``n`` rows, or none
    at all: a 429 gives back what was taken."""
    slots: list[Slot | None] = []
    places = 0
    try:
        for _ in range(n):
            slots.append(rt.quotas.acquire(key) if key is not None and rt.quotas is not None else None)
            rt.admit()
            places += 1
    except ApiError:
        for slot in slots:
            if slot is not None:
                slot.release()
        for _ in range(places):
            rt.engine.generator.unreserve()
        raise
    return slots


async def submit_many(
    rt: Runtime,
    rows: list[tuple[list[int], SamplingParams]],
    adapter_id: str | None,
    where_adapter: str,
    *,
    key: str | None = None,
) -> list[Submitted]:
    """``submit`` for several (prompt, settings) rows on one adapter: all are admitted or none (a
    429 names the limit), and they are queued together, so they run batched and rows with the same
    prompt are prefilled once (``n`` samples)."""
    slots = _admit_rows(rt, len(rows), key)
    streams, engine_rows = [], []
    for (ids, params), slot in zip(rows, slots, strict=True):
        stream = AsyncStream()
        sink = stream if rt.metrics is None else rt.metrics.sink(stream)
        if slot is not None:  # released when the generation's FinishEvent passes
            slot.inner, sink = sink, slot
        streams.append(stream)
        engine_rows.append((ids, params, sink))
    submit = functools.partial(rt.engine.submit_many, engine_rows, adapter_id, reserved=True)
    task = asyncio.ensure_future(asyncio.to_thread(submit))
    try:
        reqs = await asyncio.shield(task)
    except asyncio.CancelledError:
        # The handler went away: never leave the generations running (nor the slots held).
        task.add_done_callback(functools.partial(_cancel_orphans, slots))
        raise
    except BaseException as exc:
        for slot in slots:  # nothing was queued: no FinishEvent will come
            if slot is not None:
                slot.release()
        if isinstance(exc, UnknownAdapter):
            raise ApiError(404, "no adapter with this id", where_adapter) from None
        raise
    for slot, req in zip(slots, reqs, strict=True):
        if slot is not None:
            slot.request = req
        if rt.metrics is not None:
            rt.metrics.submitted(adapter_id)
    return [Submitted(req, stream, where_adapter) for req, stream in zip(reqs, streams, strict=True)]


# ------------------------------------------------------------------------------------ results


@dataclass
class Result:
    finish: FinishEvent
    tokens: list[TokenEvent] = field(default_factory=list)
    prompt: PromptEvent | None = None  # when the request asked for its prompt's log-probabilities


def check_finish(rt: Runtime, finish: FinishEvent, sub: Submitted | None = None) -> None:
    """A generation that failed becomes an error for this request only:

    * 503 while shutting down, or when the engine had no room for it (e.g. the device adapter
      budget is full of pinned adapters);
    * 422 naming the adapter field when the model's scores became NaN / inf with its adapter (the
      adapter's weights do not work on this prompt: the request's own input, not a server fault);
    * else 500 (the base model's scores went non-finite, or one of its steps raised: a server bug,
      logged); the requests batched with it are unaffected.
    """
    if finish.finish_reason != "error":
        return
    retry = {"Retry-After": str(rt.settings.retry_after_s)}
    if rt.not_ready_reason() is not None:
        raise ApiError(503, "the server is shutting down", headers=retry)
    if finish.retryable:
        log.warning("no room for a request: %s", finish.error)
        raise ApiError(
            503, "no room for this adapter right now (device adapter budget in use)", headers=retry
        )
    at = f"at generated token {finish.completion_tokens + 1}"
    if finish.error_kind == "non_finite" and sub is not None and sub.adapter is not None:
        log.warning("adapter %s@%s: non-finite scores %s", sub.adapter, sub.adapter_version, at)
        message = f"adapter '{sub.adapter}' made the model's next-token scores NaN or inf ({at})"
        raise ApiError(422, message, sub.where_adapter)
    log.error("generation failed: %s", finish.error)
    if finish.error_kind == "non_finite":
        raise ApiError(500, f"generation failed: the model's next-token scores were NaN or inf ({at})")
    raise ApiError(500, "generation failed")


async def _cancel_on_disconnect(receive: Receive, *reqs: GenerationRequest) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            for req in reqs:
                req.cancel()
            return


async def _read(sub: Submitted) -> Result:
    tokens: list[TokenEvent] = []
    prompt = None
    async for event in sub.stream:
        if isinstance(event, TokenEvent):
            tokens.append(event)
        elif isinstance(event, PromptEvent):
            prompt = event
        else:
            return Result(event, tokens, prompt)
    raise AssertionError("event stream ended without a FinishEvent")


async def collect(rt: Runtime, request: Request, sub: Submitted) -> Result:
    """Wait for the whole generation; a client that disconnects meanwhile cancels it. A failed
    generation raises its request's error (``check_finish``)."""
    return (await collect_many(rt, request, [sub]))[0]


async def collect_many(rt: Runtime, request: Request, subs: list[Submitted]) -> list[Result]:
    """``collect`` for the generations of one HTTP request (one disconnect watcher for all); each
    finish is checked once all have ended."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, *(s.req for s in subs)))
    try:
        results = list(await asyncio.gather(*(_read(s) for s in subs)))
    finally:
        watcher.cancel()
        for sub in subs:
            sub.req.cancel()  # no-op once finished; stops the work if this handler is cancelled
    for sub, result in zip(subs, results, strict=True):
        check_finish(rt, result.finish, sub)
    return results


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` whose generation is cancelled however the response ends
    (client disconnect, server shutdown, error)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass
        finally:
            self._on_close()
