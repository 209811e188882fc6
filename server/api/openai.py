"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

``model`` is the base model's name or an adapter id, so OpenAI's own client works unchanged.
Streams use OpenAI's chunk format and end with ``data: [DONE]``. As in OpenAI's API,
``temperature`` defaults to 1 here (the native ``/generate`` defaults to greedy).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Path, Request

from adapters_store.ids import is_valid_id
from server.engine.requests import PromptEvent, TokenEvent
from server.runtime import Runtime

from . import inference
from .deps import InferScope, ReadyRuntime, StoreDep, granted_scope
from .errors import ApiError, error_body
from .jsonbody import JSONRoute
from .logprobs import chat_logprobs, completion_logprobs, generated_scored, prompt_part
from .prompts import completion_prompts
from .quotas import caller_key
from .schemas import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[InferScope], route_class=JSONRoute)

# 400: a body that cannot be decoded at all (e.g. not UTF-8); invalid JSON text is 422.
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)}
_STREAM_DOC = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: OpenAI chunks"}
_JSON_BODY = {415: {"model": ErrorBody}}  # routes with a JSON body: not a JSON Content-Type
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
OWNER = "facet"


def _adapter_for(rt: Runtime, model: str) -> str | None:
    """``None`` for the base model, else the adapter id (422 if it cannot be one)."""
    if model == rt.engine.base.name:
        return None
    if not is_valid_id(model):
        raise ApiError(422, "model must be the base model's name or an adapter id", "body.model")
    return model


def _params(rt: Runtime, body, max_tokens: int, where_max: str, logprobs: bool, **more) -> list:
    """The sampling settings of each of the ``n`` choices of one prompt: independent samples, the
    seed of choice ``j`` is ``seed + j``."""
    n = body.n or 1
    if getattr(body, "best_of", None) not in (None, n):
        raise ApiError(422, "best_of must equal n (extra samples are not ranked)", "body.best_of")
    first = inference.sampling_params(
        rt,
        max_new_tokens=max_tokens,
        where_max=where_max,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=body.stop,
        logprobs=logprobs,
        logit_bias=_logit_bias(rt, body.logit_bias),
        **more,
    )
    return inference.samples(first, n)


def _logit_bias(rt: Runtime, bias: dict[str, float] | None) -> dict[int, float]:
    """``{token id: bias}``; every key a token id of the vocabulary (422 naming the key)."""
    vocab, out = rt.engine.base.vocab_size, {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab):
            where = f"body.logit_bias.{key[:40]}"
            raise ApiError(422, f"keys must be token ids of the vocabulary (0 .. {vocab - 1})", where)
        out[int(key)] = value
    return out


def _total_usage(finishes: list, n: int) -> dict:
    """Usage of all choices; the prompt of ``n`` samples counts once (as OpenAI counts it)."""
    prompt = sum(f.prompt_tokens for f in finishes[::n])
    completion = sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream_choices(subs: list, per_choice, head: dict, n: int, include_usage: bool):
    """Each choice's chunks in turn (all were queued together, so they run batched meanwhile),
    then the usage and ``[DONE]``; a choice that fails ends the stream with its error."""
    finishes = []
    for index, sub in enumerate(subs):
        finish = None
        async for chunk in per_choice(sub, index):
            if isinstance(chunk, str):
                yield chunk
            else:
                finish = chunk
        if finish is None:  # the choice failed: its error event was sent
            for other in subs:
                other.req.cancel()
            return
        finishes.append(finish)
    if include_usage:
        yield inference.sse({**head, "choices": [], "usage": _total_usage(finishes, n)})
    yield inference.sse("[DONE]")


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# -------------------------------------------------------------------------------- completions


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, **_JSON_BODY, 200: _STREAM_DOC},
    summary="OpenAI-compatible text completion (also prompt scoring: echo + logprobs + max_tokens 0)",
)
async def completions(body: CompletionRequest, request: Request, rt: ReadyRuntime):
    adapter = _adapter_for(rt, body.model)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    prompts = await completion_prompts(rt, body.prompt, score_only=max_tokens == 0)
    k = body.logprobs
    prompt_k = k if body.echo else None  # the prompt's own scores: only what echo returns
    samples = _params(
        rt, body, max_tokens, "body.max_tokens", k is not None, top_logprobs=k or 0, prompt_logprobs=prompt_k
    )
    if len(prompts) * len(samples) > MAX_PROMPTS:
        raise ApiError(422, f"prompts x n must be <= {MAX_PROMPTS}", "body.n")
    rows = [(ids, params) for ids in prompts for params in samples]  # choice index = prompt * n + sample
    subs = await _submit_all(rt, rows, adapter, caller_key(request))
    head = {"id": f"cmpl-{subs[0].req.id}", "object": "text_completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:

        def per_choice(sub, index):
            return _choice_chunks(rt, sub, head, index, body.echo, k is not None)

        chunks = _stream_choices(subs, per_choice, head, len(samples), _include_usage(body))
        return inference.EventStream(chunks, lambda: [s.req.cancel() for s in subs])
    results = await inference.collect_many(rt, request, subs)
    choices = [
        await _completion_choice(rt, i, sub, result, body.echo, k is not None)
        for i, (sub, result) in enumerate(zip(subs, results, strict=True))
    ]
    usage = _total_usage([r.finish for r in results], len(samples))
    return {**head, "choices": choices, "usage": usage}


async def _submit_all(rt: Runtime, rows, adapter, key) -> list[inference.Submitted]:
    """One engine request per (prompt, settings) row, all admitted or none, queued together (so
    batched together; the samples of one prompt are prefilled once)."""
    return await inference.submit_many(rt, rows, adapter, "body.model", key=key)


async def _completion_choice(rt: Runtime, index: int, sub, result, echo: bool, logprobs: bool) -> dict:
    part = await prompt_part(rt, sub.req.prompt_token_ids, result.prompt) if echo else None
    prompt_text = "".join(part.deltas) if part is not None else ""
    lp = None
    if logprobs:
        parts = ([part] if part is not None else []) + [generated_scored(result.tokens)]
        lp = await completion_logprobs(rt, parts)
    return {
        "index": index,
        "text": prompt_text + result.finish.text,
        "finish_reason": _FINISH[result.finish.finish_reason],
        "logprobs": lp,
    }


async def _choice_chunks(rt: Runtime, sub, head: dict, index: int, echo: bool, logprobs: bool):
    """The SSE chunks of one choice, then its FinishEvent (not a chunk) unless it failed."""
    offset = 0

    def chunk(text: str, lp=None, finish_reason=None) -> str:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": lp}
        return inference.sse({**head, "choices": [choice]})

    if echo and not logprobs:  # no PromptEvent comes: the prompt's text alone
        part = await prompt_part(rt, sub.req.prompt_token_ids)
        offset = len(text := "".join(part.deltas))
        yield chunk(text)
    async for event in sub.stream:
        if isinstance(event, PromptEvent):
            part = await prompt_part(rt, event.token_ids, event)
            text = "".join(part.deltas)
            yield chunk(text, await completion_logprobs(rt, [part]))
            offset += len(text)
        elif isinstance(event, TokenEvent):
            if not event.text_delta and not logprobs:
                continue
            lp = await completion_logprobs(rt, [generated_scored([event])], offset) if logprobs else None
            offset += len(event.text_delta)
            yield chunk(event.text_delta, lp)
        else:
            try:
                inference.check_finish(rt, event, sub)
            except ApiError as exc:
                yield inference.sse(error_body(exc.type, exc.message, exc.where))
                return
            yield chunk("", finish_reason=_FINISH[event.finish_reason])
            yield event


# --------------------------------------------------------------------------- chat completions


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, **_JSON_BODY, 200: _STREAM_DOC},
    summary="OpenAI-compatible chat completion (the base model's chat template)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, rt: ReadyRuntime):
    adapter = _adapter_for(rt, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    ids = await inference.prompt_ids(rt, None, messages, "body.messages")
    if body.max_completion_tokens is not None:
        max_tokens, where_max = body.max_completion_tokens, "body.max_completion_tokens"
    else:
        max_tokens, where_max = body.max_tokens, "body.max_tokens"
    if max_tokens is None:
        max_tokens = rt.settings.max_new_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(422, "top_logprobs needs logprobs: true", "body.top_logprobs")
    samples = _params(rt, body, max_tokens, where_max, body.logprobs, top_logprobs=body.top_logprobs or 0)
    subs = await _submit_all(rt, [(ids, p) for p in samples], adapter, caller_key(request))
    head = {"id": f"chatcmpl-{subs[0].req.id}", "object": "chat.completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:
        head["object"] = "chat.completion.chunk"

        def per_choice(sub, index):
            return _chat_chunks(rt, sub, head, index, body.logprobs)

        chunks = _stream_choices(subs, per_choice, head, len(samples), _include_usage(body))
        return inference.EventStream(chunks, lambda: [s.req.cancel() for s in subs])
    results = await inference.collect_many(rt, request, subs)
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": result.finish.text},
            "finish_reason": _FINISH[result.finish.finish_reason],
            "logprobs": await chat_logprobs(rt, result.tokens) if body.logprobs else None,
        }
        for index, result in enumerate(results)
    ]
    return {**head, "choices": choices, "usage": _total_usage([r.finish for r in results], len(samples))}


async def _chat_chunks(rt: Runtime, sub: inference.Submitted, head: dict, index: int, logprobs: bool):
    """The SSE chunks of one choice, then its FinishEvent (not a chunk) unless it failed."""

    def chunk(delta: dict, finish_reason=None, logprobs_=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs_, "finish_reason": finish_reason}
        return inference.sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in sub.stream:
        if isinstance(event, TokenEvent):
            if not event.text_delta and not logprobs:
                continue
            lp = await chat_logprobs(rt, [event]) if logprobs else None
            yield chunk({"content": event.text_delta}, logprobs_=lp)
            continue
        try:
            inference.check_finish(rt, event, sub)
        except ApiError as exc:
            yield inference.sse(error_body(exc.type, exc.message, exc.where))
            return
        yield chunk({}, _FINISH[event.finish_reason])
        yield event


# ------------------------------------------------------------------------------------- models


def _base_card(rt: Runtime) -> dict:
    return {"id": rt.engine.base.name, "object": "model", "created": 0, "owned_by": OWNER}


def _adapter_card(rt: Runtime, record) -> dict:
    return {
        "id": record.adapter_id,
        "object": "model",
        "created": int(record.created_at),
        "owned_by": OWNER,
        "parent": rt.engine.base.name,
        "root": rt.engine.base.name,
    }


def _all_records(store) -> list:
    records, offset = [], 0
    while True:
        page, total = store.list(offset, 1000)
        records += page
        offset += len(page)
        if not page or offset >= total:
            return records


@router.get("/models", response_model=ModelList, responses=_ERRORS, summary="Base model and adapters")
async def list_models(request: Request, rt: ReadyRuntime, store: StoreDep):
    """Adapters are listed to ``admin`` keys only: an ``infer`` key never learns an adapter id it
    was not given (the rule that keeps ``/metrics``, whose series name adapters, admin-only)."""
    records = []
    if granted_scope(request) == "admin":
        records = await asyncio.to_thread(_all_records, store)
    return {"object": "list", "data": [_base_card(rt)] + [_adapter_card(rt, r) for r in records]}


@router.get("/models/{model}", response_model=ModelCard, responses=_ERRORS, summary="One model")
async def get_model(rt: ReadyRuntime, store: StoreDep, model: Annotated[str, Path(max_length=256)]):
    if model == rt.engine.base.name:
        return _base_card(rt)
    if not is_valid_id(model):
        raise ApiError(404, "no model with this id", "model")
    return _adapter_card(rt, await asyncio.to_thread(store.get, model))
