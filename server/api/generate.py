"""``POST /generate``: the native generation route (JSON, or Server-Sent Events with ``stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.engine.requests import TokenEvent

from . import inference
from .deps import InferScope, ReadyRuntime
from .errors import ApiError, error_body
from .jsonbody import JSONRoute
from .quotas import caller_key
from .runtime import Runtime
from .schemas import ErrorBody, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"], dependencies=[InferScope], route_class=JSONRoute)

# 400: a body that is not UTF-8; invalid or non-strict JSON text is 422; 415: not a JSON Content-Type.
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)}
_SSE_DOC = {
    "description": "With `stream: true`: Server-Sent Events. `event: token` per generated token "
    '(`{"token_id", "text", "logprob"?}`), then `event: done` with the JSON response above, or '
    '`event: error` with `{"error": {...}}`.',
    "content": {"text/event-stream": {}},
}


def _response(sub: inference.Submitted, result: inference.Result, token_strings: list[str] | None) -> dict:
    finish = result.finish
    body = {
        "text": finish.text,
        "adapter": sub.adapter,
        "adapter_version": sub.adapter_version,
        "finish_reason": finish.finish_reason,
        "usage": {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens},
        "logprobs": None,
    }
    if token_strings is not None:
        body["logprobs"] = [
            {"token_id": t.token_id, "token": s, "logprob": t.logprob}
            for t, s in zip(result.tokens, token_strings, strict=True)
        ]
    return body


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: _SSE_DOC},
    summary="Generate text with the base model or an adapter",
)
async def generate(body: GenerateRequest, request: Request, rt: ReadyRuntime):
    where_prompt = "body.messages" if body.messages is not None else "body.prompt"
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(422, "give exactly one of 'prompt' and 'messages'", "body.prompt")
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    ids = await inference.prompt_ids(rt, body.prompt, messages, where_prompt)
    params = inference.sampling_params(
        rt,
        max_new_tokens=body.max_new_tokens,
        where_max="body.max_new_tokens",
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        logprobs=body.logprobs,
    )
    sub = await inference.submit(rt, ids, params, body.adapter, "body.adapter", key=caller_key(request))
    if body.stream:
        return inference.EventStream(_events(rt, sub, body.logprobs), sub.req.cancel)
    result = await inference.collect(request, sub)
    inference.check_finish(rt, result.finish, sub)
    strings = None
    if body.logprobs:
        strings = await inference.token_strings(rt, result.tokens)
    return _response(sub, result, strings)


async def _events(rt: Runtime, sub: inference.Submitted, logprobs: bool) -> AsyncIterator[str]:
    tokens: list[TokenEvent] = []
    async for event in sub.stream:
        if isinstance(event, TokenEvent):
            tokens.append(event)
            data = {"token_id": event.token_id, "text": event.text_delta}
            if logprobs:
                data["logprob"] = event.logprob
            yield inference.sse(data, "token")
            continue
        try:
            inference.check_finish(rt, event, sub)
        except ApiError as exc:
            yield inference.sse(error_body(exc.type, exc.message, exc.where), "error")
            return
        strings = None
        if logprobs:
            strings = await inference.token_strings(rt, tokens)
        yield inference.sse(_response(sub, inference.Result(event, tokens), strings), "done")
