"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

``model`` is the base model's name or an adapter id, so OpenAI's own client works unchanged.
Streams use OpenAI's chunk format and end with ``data: [DONE]``. As in OpenAI's API,
``temperature`` defaults to 1 here (the native ``/generate`` defaults to greedy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request

from adapters_store.ids import is_valid_id
from server.engine.requests import TokenEvent

from . import inference
from .deps import InferScope, ReadyRuntime, StoreDep, granted_scope
from .errors import ApiError, error_body
from .jsonbody import JSONRoute
from .quotas import caller_key
from .runtime import Runtime
from .schemas import (
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


def _usage(finish) -> dict:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _params(rt: Runtime, body, max_tokens: int, where_max: str, logprobs: bool):
    return inference.sampling_params(
        rt,
        max_new_tokens=max_tokens,
        where_max=where_max,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=body.stop,
        logprobs=logprobs,
    )


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# -------------------------------------------------------------------------------- completions


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, **_JSON_BODY, 200: _STREAM_DOC},
    summary="OpenAI-compatible text completion",
)
async def completions(body: CompletionRequest, request: Request, rt: ReadyRuntime):
    adapter = _adapter_for(rt, body.model)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    ids = await inference.prompt_ids(rt, prompt, None, "body.prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    params = _params(rt, body, max_tokens, "body.max_tokens", body.logprobs is not None)
    sub = await inference.submit(rt, ids, params, adapter, "body.model", key=caller_key(request))
    head = {"id": f"cmpl-{sub.req.id}", "object": "text_completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:
        chunks = _completion_chunks(rt, sub, head, body.logprobs is not None, _include_usage(body))
        return inference.EventStream(chunks, sub.req.cancel)
    result = await inference.collect(request, sub)
    inference.check_finish(rt, result.finish, sub)
    logprobs = None
    if body.logprobs is not None:
        logprobs = await _completion_logprobs(rt, result.tokens, 0)
    choice = {
        "index": 0,
        "text": result.finish.text,
        "finish_reason": _FINISH[result.finish.finish_reason],
        "logprobs": logprobs,
    }
    return {**head, "choices": [choice], "usage": _usage(result.finish)}


async def _completion_logprobs(rt: Runtime, tokens, offset: int) -> dict:
    strings = await inference.token_strings(rt, tokens)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text_delta)
    return {
        "tokens": strings,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": None,
        "text_offset": offsets,
    }


async def _completion_chunks(
    rt: Runtime, sub: inference.Submitted, head: dict, logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    offset = 0
    async for event in sub.stream:
        if isinstance(event, TokenEvent):
            if not event.text_delta and not logprobs:
                continue
            choice = {"index": 0, "text": event.text_delta, "finish_reason": None, "logprobs": None}
            if logprobs:
                choice["logprobs"] = await _completion_logprobs(rt, [event], offset)
            offset += len(event.text_delta)
            yield inference.sse({**head, "choices": [choice]})
            continue
        try:
            inference.check_finish(rt, event, sub)
        except ApiError as exc:
            yield inference.sse(error_body(exc.type, exc.message, exc.where))
            return
        last = {"index": 0, "text": "", "finish_reason": _FINISH[event.finish_reason], "logprobs": None}
        yield inference.sse({**head, "choices": [last]})
        if include_usage:
            yield inference.sse({**head, "choices": [], "usage": _usage(event)})
        yield inference.sse("[DONE]")


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
    params = _params(rt, body, max_tokens, where_max, body.logprobs)
    sub = await inference.submit(rt, ids, params, adapter, "body.model", key=caller_key(request))
    head = {"id": f"chatcmpl-{sub.req.id}", "object": "chat.completion", "created": int(time.time())}
    head["model"] = body.model
    if body.stream:
        head["object"] = "chat.completion.chunk"
        chunks = _chat_chunks(rt, sub, head, body.logprobs, _include_usage(body))
        return inference.EventStream(chunks, sub.req.cancel)
    result = await inference.collect(request, sub)
    inference.check_finish(rt, result.finish, sub)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.finish.text},
        "finish_reason": _FINISH[result.finish.finish_reason],
        "logprobs": await _chat_logprobs(rt, result.tokens) if body.logprobs else None,
    }
    return {**head, "choices": [choice], "usage": _usage(result.finish)}


async def _chat_logprobs(rt: Runtime, tokens) -> dict:
    strings = await inference.token_strings(rt, tokens)
    return {
        "content": [
            {"token": s, "logprob": t.logprob, "bytes": list(s.encode()), "top_logprobs": []}
            for s, t in zip(strings, tokens, strict=True)
        ]
    }


async def _chat_chunks(
    rt: Runtime, sub: inference.Submitted, head: dict, logprobs: bool, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason=None, logprobs_=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs_, "finish_reason": finish_reason}
        return inference.sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in sub.stream:
        if isinstance(event, TokenEvent):
            if not event.text_delta and not logprobs:
                continue
            lp = await _chat_logprobs(rt, [event]) if logprobs else None
            yield chunk({"content": event.text_delta}, logprobs_=lp)
            continue
        try:
            inference.check_finish(rt, event, sub)
        except ApiError as exc:
            yield inference.sse(error_body(exc.type, exc.message, exc.where))
            return
        yield chunk({}, _FINISH[event.finish_reason])
        if include_usage:
            yield inference.sse({**head, "choices": [], "usage": _usage(event)})
        yield inference.sse("[DONE]")


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
