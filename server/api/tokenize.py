"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shape (evaluation tools count and cut
prompts with them). Every adapter shares the base model's tokenizer, so ``model`` is optional and
only checked for form.

    /tokenize   {"prompt": "...", "add_special_tokens": true}
                {"messages": [...], "add_special_tokens": false}   (the chat template applied)
             -> {"tokens": [...], "count": n, "max_model_len": L}
    /detokenize {"tokens": [...]} -> {"prompt": "..."}
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.runtime import Runtime

from . import inference
from .deps import InferScope, ReadyRuntime
from .errors import ApiError
from .jsonbody import JSONRoute
from .prompts import check_token_ids, encode_texts
from .schemas import MAX_MESSAGES, ErrorBody, OpenAIMessage

router = APIRouter(tags=["tokenize"], dependencies=[InferScope], route_class=JSONRoute)
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 413, 415, 422, 503)}


class TokenizeRequest(BaseModel):
    """Give ``prompt`` or ``messages``, not both. ``add_special_tokens`` defaults to true for a
    prompt (as ``/v1/completions`` encodes it) and false for messages (the template has them)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    prompt: str | None = None
    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = Field(None, strict=True)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = Field(description="the model's context in tokens")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    tokens: list[Annotated[int, Field(strict=True)]]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=_ERRORS, summary="Text or chat to token ids"
)
async def tokenize(body: TokenizeRequest, rt: ReadyRuntime):
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(422, "give exactly one of 'prompt' and 'messages'", "body.prompt")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        special = bool(body.add_special_tokens)
        ids = await inference.chat_ids(rt, messages, "body.messages", add_special_tokens=special)
    else:
        special = body.add_special_tokens is not False
        ids = (await asyncio.to_thread(encode_texts, rt, [body.prompt], special))[0]
    return {"tokens": ids, "count": len(ids), "max_model_len": rt.engine.generator.max_seq_len}


def _decode(rt: Runtime, ids: list[int]) -> str:
    with rt.tokenizer_lock:
        return rt.engine.base.tokenizer.decode(ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, summary="Token ids to text")
async def detokenize(body: DetokenizeRequest, rt: ReadyRuntime):
    check_token_ids(rt, body.tokens, "body.tokens")
    cap = rt.settings.max_prompt_tokens
    if len(body.tokens) > cap:
        raise ApiError(
            422, f"{len(body.tokens)} tokens; the limit is {cap} (max_prompt_tokens)", "body.tokens"
        )
    return {"prompt": await asyncio.to_thread(_decode, rt, body.tokens)}
