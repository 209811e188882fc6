"""The prompt forms of ``/v1/completions`` and ``/tokenize``: a string, a list of strings, a list of
token ids or a list of token-id lists, to one token-id list per prompt, each checked.

Token ids are checked against the model's vocabulary (422 naming the offending index, e.g.
``body.prompt.1.3``); a prompt over the server's ``max_prompt_tokens`` is 422, one that does not
fit the model's context is 400 naming both numbers (a prompt that is only scored may fill the
whole context: it needs no position for a new token).
"""

from __future__ import annotations

import asyncio

from server.runtime import Runtime

from .errors import ApiError


def _forms(prompt: str | list, where: str) -> list[tuple[str | list[int], str]]:
    """``[(text or token ids, its field path)]``: one entry per prompt."""
    if isinstance(prompt, str):
        return [(prompt, where)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [(list(prompt), where)]
    return [(p, f"{where}.{i}") for i, p in enumerate(prompt)]


def encode_texts(rt: Runtime, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text (worker thread: takes the tokenizer lock once for all)."""
    tokenizer = rt.engine.base.tokenizer
    with rt.tokenizer_lock:
        return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]


def check_token_ids(rt: Runtime, ids: list[int], where: str) -> None:
    """Every id must be a row of the model's vocabulary (422 naming the index of the first that is not)."""
    vocab = rt.engine.base.vocab_size
    for j, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ApiError(422, f"token id {t} is not in the vocabulary (0 .. {vocab - 1})", f"{where}.{j}")


def check_length(rt: Runtime, n: int, where: str, *, score_only: bool) -> None:
    """A prompt of ``n`` tokens within ``max_prompt_tokens`` (422) and the model's context (400)."""
    if n == 0:
        raise ApiError(422, "the prompt has no tokens", where)
    cap = rt.settings.max_prompt_tokens
    if n > cap:
        raise ApiError(422, f"the prompt has {n} tokens; the limit is {cap} (max_prompt_tokens)", where)
    context = rt.engine.generator.max_seq_len
    if context is not None and n + (0 if score_only else 1) > context:
        needs = "" if score_only else " (and one position for the first new token)"
        message = f"the prompt has {n} tokens; the model's context is {context} tokens{needs}"
        raise ApiError(400, message, where)


async def completion_prompts(
    rt: Runtime, prompt: str | list, where: str = "body.prompt", *, score_only: bool = False
) -> list[list[int]]:
    """One checked token-id list per prompt of ``prompt`` (any of the four forms)."""
    forms = _forms(prompt, where)
    texts = [(i, p) for i, (p, _) in enumerate(forms) if isinstance(p, str)]
    out: list[list[int]] = [p if isinstance(p, list) else [] for p, _ in forms]
    if texts:
        encoded = await asyncio.to_thread(encode_texts, rt, [t for _, t in texts])
        for (i, _), ids in zip(texts, encoded, strict=True):
            out[i] = ids
    for (p, path), ids in zip(forms, out, strict=True):
        if isinstance(p, list):
            check_token_ids(rt, ids, path)
        check_length(rt, len(ids), path, score_only=score_only)
    return out
