"""``POST /generate``: the native generation route (JSON, or Server-Sent Events with ``stream``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.engine.requests import FinishEvent, PromptEvent, TokenEvent
from server.runtime import Runtime

from . import inference
from .deps import InferScope, ReadyRuntime
from .errors import ApiError, error_body
from .jsonbody import JSONRoute
from .logprobs import decode_each
from .quotas import caller_key
from .schemas import ErrorBody, GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"], dependencies=[InferScope], route_class=JSONRoute)

# 400: a body that is not UTF-8; invalid or non-strict JSON text is 422; 415: not a JSON Content-Type.
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)}
_SSE_DOC = {
    "description": "With `stream: true`: Server-Sent Events. `event: token` per generated token "
    '(`{"token_id", "text", "index"?, "logprob"?, "top_logprobs"?}`; `index`: the sample, with '
    "`n > 1`), after `event: prompt` "
    '(`{"prompt_logprobs"}`) when asked; then `event: done` with the JSON response above, or '
    '`event: error` with `{"error": {...}}`.',
    "content": {"text/event-stream": {}},
}


async def _entries(rt: Runtime, ids, logprobs, tops) -> list[dict]:
    """``[{token_id, token, logprob, top_logprobs}]`` (tokens decoded alone, in one thread hop)."""
    wanted = set(ids) | {t for top in tops for t, _ in top or ()}
    text = await decode_each(rt, wanted)

    def alternatives(top):
        return None if top is None else [{"token_id": t, "token": text[t], "logprob": v} for t, v in top]

    return [
        {"token_id": t, "token": text[t], "logprob": lp, "top_logprobs": alternatives(top)}
        for t, lp, top in zip(ids, logprobs, tops, strict=True)
    ]


async def _prompt_entries(rt: Runtime, event: PromptEvent | None) -> list[dict] | None:
    if event is None:
        return None
    tops = event.top_logprobs or [None] * len(event.token_ids)
    return await _entries(rt, event.token_ids, event.logprobs, tops)


def _usage(results: list[inference.Result]) -> dict:
    """The prompt once, every sample's generated tokens."""
    completion = sum(r.finish.completion_tokens for r in results)
    return {"prompt_tokens": results[0].finish.prompt_tokens, "completion_tokens": completion}


async def _choice(rt: Runtime, index: int, result: inference.Result, logprobs: bool) -> dict:
    finish, tokens = result.finish, result.tokens
    entries = None
    if logprobs:
        ids, lps = [t.token_id for t in tokens], [t.logprob for t in tokens]
        entries = await _entries(rt, ids, lps, [t.top_logprobs for t in tokens])
    return {
        "index": index,
        "text": finish.text,
        "finish_reason": finish.finish_reason,
        "completion_tokens": finish.completion_tokens,
        "logprobs": entries,
    }


async def _response(
    rt: Runtime, sub: inference.Submitted, results: list[inference.Result], logprobs: bool
) -> dict:
    """Sample 0 at the top level (the shape of a single generation), every sample in ``choices``."""
    choices = [await _choice(rt, j, r, logprobs) for j, r in enumerate(results)]
    return {
        "text": choices[0]["text"],
        "adapter": sub.adapter,
        "adapter_version": sub.adapter_version,
        "finish_reason": choices[0]["finish_reason"],
        "usage": _usage(results),
        "logprobs": choices[0]["logprobs"],
        "prompt_logprobs": await _prompt_entries(rt, results[0].prompt),
        "choices": choices,
    }


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
        top_logprobs=body.top_logprobs,
        prompt_logprobs=body.prompt_logprobs,
    )
    if body.top_logprobs and not body.logprobs:
        raise ApiError(422, "top_logprobs needs logprobs: true", "body.top_logprobs")
    rows = [(ids, p) for p in inference.samples(params, body.n, prompt_scores_once=True)]
    subs = await inference.submit_many(rt, rows, body.adapter, "body.adapter", key=caller_key(request))
    if body.stream:
        return inference.EventStream(_events(rt, subs, body.logprobs), lambda: [s.req.cancel() for s in subs])
    results = await inference.collect_many(rt, request, subs)
    return await _response(rt, subs[0], results, body.logprobs)


async def _token_data(rt: Runtime, event: TokenEvent, logprobs: bool, index: int, n: int) -> dict:
    data = {"token_id": event.token_id, "text": event.text_delta}
    if n > 1:
        data["index"] = index
    if logprobs:
        data["logprob"] = event.logprob
        if event.top_logprobs is not None:
            top = await _entries(rt, [event.token_id], [event.logprob], [event.top_logprobs])
            data["top_logprobs"] = top[0]["top_logprobs"]
    return data


async def _tagged(index: int, sub: inference.Submitted, out: asyncio.Queue) -> None:
    async for event in sub.stream:
        await out.put((index, event))


async def _events(rt: Runtime, subs: list[inference.Submitted], logprobs: bool) -> AsyncIterator[str]:
    """Every sample's events as they come (``index`` names the sample when ``n > 1``), then one
    ``done`` with the whole response; a sample that fails ends the stream with its error and
    cancels the others."""
    queue: asyncio.Queue = asyncio.Queue()
    readers = [asyncio.ensure_future(_tagged(j, sub, queue)) for j, sub in enumerate(subs)]
    tokens: list[list[TokenEvent]] = [[] for _ in subs]
    finishes: dict[int, FinishEvent] = {}
    prompt = None
    try:
        while len(finishes) < len(subs):
            index, event = await queue.get()
            if isinstance(event, PromptEvent):
                prompt = event
                yield inference.sse({"prompt_logprobs": await _prompt_entries(rt, event)}, "prompt")
            elif isinstance(event, TokenEvent):
                tokens[index].append(event)
                yield inference.sse(await _token_data(rt, event, logprobs, index, len(subs)), "token")
            else:
                try:
                    inference.check_finish(rt, event, subs[index])
                except ApiError as exc:
                    yield inference.sse(error_body(exc.type, exc.message, exc.where), "error")
                    return
                finishes[index] = event
        results = [
            inference.Result(finishes[j], tokens[j], prompt if j == 0 else None) for j in range(len(subs))
        ]
        yield inference.sse(await _response(rt, subs[0], results, logprobs), "done")
    finally:
        for sub in subs:
            sub.req.cancel()  # a no-op for finished samples
        for reader in readers:
            reader.cancel()
