"""Log-probabilities in OpenAI's two shapes, from the engine's events.

* ``/v1/completions`` (legacy): ``{tokens, token_logprobs, top_logprobs, text_offset}``. Each
  ``top_logprobs`` entry maps token text to log-probability: the ``k`` best plus the chosen token
  (as OpenAI and vLLM do, so up to ``k + 1`` entries); the first prompt token's entries are
  ``null``. ``text_offset`` is where each token's text starts in the returned text (with ``echo``,
  the prompt's text first): the offsets follow the text the tokens decode to, so they are monotone
  and ``text[offset_i:offset_i+1]`` is token ``i``'s share of it.
* ``/v1/chat/completions``: ``content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}] (the k best)}``.

A token's ``token`` text is the token decoded alone. Decoding runs in a worker thread under the
tokenizer lock, once per response (or chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.engine.requests import IncrementalDetokenizer, PromptEvent, TokenEvent, TopLogprobs
from server.runtime import Runtime


@dataclass
class Scored:
    """Tokens with their log-probabilities and text shares (a prompt's, or generated ones)."""

    ids: list[int]
    logprobs: list[float | None]
    tops: list[TopLogprobs | None]  # per token; None = no alternatives asked (or the first prompt token)
    deltas: list[str]  # each token's share of the text


def prompt_scored(tokenizer, ids: Sequence[int], event: PromptEvent | None) -> Scored:
    """The prompt's entries, without log-probabilities when ``event`` is None (worker thread,
    tokenizer lock held by the caller)."""
    detok = IncrementalDetokenizer(tokenizer, [], context=0)
    deltas = [detok.push(t) for t in ids]
    if deltas:
        deltas[-1] += detok.flush()
    logprobs = list(event.logprobs) if event is not None else [None] * len(ids)
    tops = list(event.top_logprobs) if event is not None and event.top_logprobs is not None else None
    return Scored(list(ids), logprobs, tops or [None] * len(ids), deltas)


def generated_scored(tokens: Sequence[TokenEvent]) -> Scored:
    return Scored(
        [t.token_id for t in tokens],
        [t.logprob for t in tokens],
        [t.top_logprobs for t in tokens],
        [t.text_delta for t in tokens],
    )


def _ids_to_decode(parts: Iterable[Scored]) -> set[int]:
    ids: set[int] = set()
    for part in parts:
        ids.update(part.ids)
        for top in part.tops:
            ids.update(t for t, _ in top or ())
    return ids


async def decode_each(rt: Runtime, ids: Iterable[int]) -> dict[int, str]:
    """``{id: the token decoded alone}`` (one worker-thread hop)."""
    tokenizer, wanted = rt.engine.base.tokenizer, sorted(set(ids))

    def decode() -> dict[int, str]:
        with rt.tokenizer_lock:
            return {t: tokenizer.decode([t]) for t in wanted}

    return await asyncio.to_thread(decode)


async def prompt_part(rt: Runtime, ids: Sequence[int], event: PromptEvent | None = None) -> Scored:
    """The prompt's text shares (what ``echo`` returns) and, given its ``PromptEvent``, scores."""
    tokenizer = rt.engine.base.tokenizer

    def build() -> Scored:
        with rt.tokenizer_lock:
            return prompt_scored(tokenizer, ids, event)

    return await asyncio.to_thread(build)


async def completion_logprobs(rt: Runtime, parts: Sequence[Scored], offset: int = 0) -> dict:
    """The legacy ``logprobs`` object of ``parts`` (in order), offsets starting at ``offset``."""
    text = await decode_each(rt, _ids_to_decode(parts))
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for t, lp, top, delta in zip(part.ids, part.logprobs, part.tops, part.deltas, strict=True):
            out["tokens"].append(text[t])
            out["token_logprobs"].append(lp)
            entry = None
            if lp is not None:
                entry = {text[i]: v for i, v in top or ()}
                entry.setdefault(text[t], lp)
            out["top_logprobs"].append(entry)
            out["text_offset"].append(offset)
            offset += len(delta)
    return out


async def chat_logprobs(rt: Runtime, tokens: Sequence[TokenEvent]) -> dict:
    """The chat ``logprobs`` object of generated ``tokens``."""
    part = generated_scored(tokens)
    text = await decode_each(rt, _ids_to_decode([part]))

    def entry(t: int, lp: float) -> dict:
        return {"token": text[t], "logprob": lp, "bytes": list(text[t].encode())}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top or ()]}
            for t, lp, top in zip(part.ids, part.logprobs, part.tops, strict=True)
        ]
    }
