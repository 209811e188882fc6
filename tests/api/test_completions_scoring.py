"""/v1/completions as evaluation tools use it: echo + logprobs + max_tokens 0 (prompt scoring),
every prompt form, token-id and context checks; top_logprobs on chat, streaming included."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.methods import Adapter
from tests.conftest import make_tiny_llama
from tests.engine.helpers import merged_copy

from .conftest import adapter_files, sse_json, upload

EPS = torch.finfo(torch.float32).eps
PROMPTS = [[5, 9, 17, 33, 2, 64], [7, 7, 8, 100, 3]]


async def _post(client, path="/v1/completions", status=200, **body):
    body = body if path == "/generate" else {"model": "tiny-llama", **body}
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def _reference(model, prompt: list[int]) -> torch.Tensor:
    """``[n, V]`` float32 log_softmax of plain transformers for ``prompt`` alone."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(-1)


def _tolerance(ref: torch.Tensor) -> float:
    """float32 summation-order noise: eps x (reduction length, at most a few hundred here, plus the
    vocabulary's logsumexp) x the logits' scale."""
    return EPS * 1024 * (1.0 + float(ref.abs().max()))


def _check_shape(choice: dict, prompt_len: int, generated: int, k: int) -> None:
    """OpenAI's legacy shape with echo: the prompt's entries first (the first one null), then the
    generated ones; offsets monotone and each token's text where its offset says."""
    lp, text = choice["logprobs"], choice["text"]
    n = prompt_len + generated
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    offsets = lp["text_offset"] + [len(text)]
    assert offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:], strict=False))
    for i, token in enumerate(lp["tokens"]):
        assert text[offsets[i] : offsets[i + 1]].strip() == token, (i, token, text)
    for token, value, top in zip(
        lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
    ):
        assert top[token] == value and k <= len(top) <= k + 1  # the k best plus the chosen token


@pytest.mark.asyncio
async def test_echo_scores_with_adapter_equal_merged_transformers(client, tmp_path):
    """Prompt scores of adapter rows and base rows, queued together (one prefill), equal plain
    transformers on the model with that adapter merged."""
    base = client.app.state.runtime.engine.base
    config, weights = adapter_files(client.app, "lora", tmp_path / "lo", seed=4)
    assert (await upload(client, "lo", config, weights)).status_code == 201
    adapter = Adapter.load(tmp_path / "lo", base.module_shapes)
    reference = make_tiny_llama()  # the tiny server's base model (same seed)
    merged = merged_copy(reference, adapter)
    k = 3
    scored, based = await asyncio.gather(
        _post(client, model="lo", prompt=PROMPTS, echo=True, logprobs=k, max_tokens=0),
        _post(client, prompt=PROMPTS[::-1], echo=True, logprobs=k, max_tokens=2, temperature=0),
    )
    for out, model, prompts, generated in (
        (scored, merged, PROMPTS, 0),
        (based, reference, PROMPTS[::-1], 2),
    ):
        assert [c["index"] for c in out["choices"]] == [0, 1]
        for choice, prompt in zip(out["choices"], prompts, strict=True):
            _check_shape(choice, len(prompt), generated, k)
            assert choice["finish_reason"] == "length"
            ref = _reference(model, prompt)
            want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            got = torch.tensor(choice["logprobs"]["token_logprobs"][1 : len(prompt)])
            tol = _tolerance(ref)
            assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()
            for j, top in enumerate(choice["logprobs"]["top_logprobs"][1 : len(prompt)]):
                best = sorted(top.values(), reverse=True)[:k]
                assert torch.allclose(torch.tensor(best), ref[j].topk(k).values, atol=tol, rtol=0)
    assert scored["usage"] == {"prompt_tokens": 11, "completion_tokens": 0, "total_tokens": 11}
    assert based["usage"]["completion_tokens"] == 4


@pytest.mark.asyncio
async def test_every_prompt_form_scores_the_same(client):
    text = "t5 t9 t17 t33"
    ids = [5, 9, 17, 33]
    forms = [text, [text, "t1 t2"], ids, [ids, [1, 2]]]
    outs = [await _post(client, prompt=p, echo=True, logprobs=0, max_tokens=0) for p in forms]
    assert [len(o["choices"]) for o in outs] == [1, 2, 1, 2]
    first = outs[0]["choices"][0]
    assert first["text"] == text and first["logprobs"]["tokens"] == text.split()
    for out in outs:
        choice = out["choices"][0]
        assert choice["text"] == text
        got, want = choice["logprobs"]["token_logprobs"], first["logprobs"]["token_logprobs"]
        assert got[0] is None and torch.allclose(torch.tensor(got[1:]), torch.tensor(want[1:]), atol=1e-5)
    assert outs[1]["choices"][1]["text"] == outs[3]["choices"][1]["text"] == "t1 t2"


@pytest.mark.asyncio
async def test_score_only_and_echo_without_logprobs(client):
    only = await _post(client, prompt="t3 t4", max_tokens=0)
    assert only["choices"][0]["text"] == "" and only["choices"][0]["finish_reason"] == "length"
    assert only["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}
    echoed = await _post(client, prompt=[3, 4], echo=True, max_tokens=2, temperature=0)
    plain = await _post(client, prompt=[3, 4], max_tokens=2, temperature=0)
    assert echoed["choices"][0]["text"] == "t3 t4" + plain["choices"][0]["text"]
    assert echoed["choices"][0]["logprobs"] is None
    single = await _post(client, prompt=[9], echo=True, logprobs=3, max_tokens=1, temperature=0)
    lp = single["choices"][0]["logprobs"]  # one prompt token: nothing to score but its text
    assert lp["tokens"][0] == "t9" and lp["token_logprobs"][0] is None and len(lp["tokens"]) == 2
    assert len(lp["top_logprobs"][1]) in (3, 4) and lp["text_offset"][0] == 0


BAD_PROMPTS = [
    ([[1, 2], [3, -1]], "body.prompt.1.1"),
    ([5, 128], "body.prompt.1"),
    ([[4], [5, 6, 2**70]], "body.prompt.1.2"),
    ([], "body.prompt"),
    ([[1], []], "body.prompt"),
    ([True, 1], "body.prompt"),
    ([1.5], "body.prompt"),
    (["t1", 2], "body.prompt"),
    (["t1"] * 65, "body.prompt"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("prompt", "where"), BAD_PROMPTS)
async def test_bad_prompts_are_422_naming_the_index(client, prompt, where):
    out = await _post(client, status=422, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    assert out["error"]["where"] == where, out
    if "vocabulary" in out["error"]["message"]:
        assert "127" in out["error"]["message"]


@pytest.mark.asyncio
async def test_context_limit_is_400_naming_both_numbers(client):
    context = client.app.state.runtime.engine.generator.max_seq_len  # 256
    full = await _post(client, prompt=[[3] * context], echo=True, logprobs=0, max_tokens=0)
    assert len(full["choices"][0]["logprobs"]["tokens"]) == context  # scoring may fill the context
    for prompt, max_tokens, where in (
        ([3] * (context + 1), 0, "body.prompt"),
        ([[1], [3] * context], 1, "body.prompt.1"),
    ):
        out = await _post(client, status=400, prompt=prompt, max_tokens=max_tokens)
        message = out["error"]["message"]
        assert (
            out["error"]["where"] == where
            and str(context) in message
            and str(len(prompt[-1]) if isinstance(prompt[-1], list) else len(prompt)) in message
        )


@pytest.mark.asyncio
async def test_streamed_echo_logprobs_equal_the_response(client):
    body = dict(prompt=["t1 t2 t3", "t4"], echo=True, logprobs=2, max_tokens=3, temperature=0)
    full = await _post(client, **body)
    response = await client.post("/v1/completions", json={"model": "tiny-llama", "stream": True, **body})
    chunks = [d for _, d in sse_json(response.text)]
    assert chunks[-1] == "[DONE]"
    for index, choice in enumerate(full["choices"]):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == "length"
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in mine[:-1]:
            for name in merged:
                merged[name] += c["logprobs"][name]
        assert merged["tokens"] == choice["logprobs"]["tokens"]
        assert merged["text_offset"] == choice["logprobs"]["text_offset"]
        assert merged["token_logprobs"][0] is None
        got = torch.tensor(merged["token_logprobs"][1:])
        assert torch.allclose(got, torch.tensor(choice["logprobs"]["token_logprobs"][1:]), atol=1e-5)


@pytest.mark.asyncio
async def test_chat_top_logprobs_streaming_and_not(client):
    messages = [{"role": "user", "content": "t4 t5 t6"}]
    body = dict(messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5)
    full = await _post(client, "/v1/chat/completions", **body)
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        top = entry["top_logprobs"]
        values = [t["logprob"] for t in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert values[0] >= entry["logprob"] - 1e-6 and top[0]["bytes"] == list(top[0]["token"].encode())
        assert any(t["token"] == entry["token"] for t in top)  # greedy: the chosen one is among the best
    response = await client.post("/v1/chat/completions", json={"model": "tiny-llama", "stream": True, **body})
    streamed = [
        e
        for _, c in sse_json(response.text)[:-1]
        if (lp := c["choices"][0]["logprobs"])
        for e in lp["content"]
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    for a, b in zip(streamed, content, strict=True):
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]
    no_top = await _post(client, "/v1/chat/completions", messages=messages, max_tokens=2, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in no_top["choices"][0]["logprobs"]["content"])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"top_logprobs": 2}, "body.top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "body.top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "body.top_logprobs"),
    ],
)
async def test_chat_top_logprobs_errors(client, body, where):
    out = await _post(
        client, "/v1/chat/completions", status=422, messages=[{"role": "user", "content": "t1"}], **body
    )
    assert out["error"]["where"] == where


@pytest.mark.asyncio
async def test_n_samples_are_independent_choices_seeded_per_choice(client):
    """n choices per prompt (index = prompt x n + sample); choice j with seed s samples as a
    request with seed s + j alone; the prompt counts once per prompt in the usage."""
    body = dict(prompt=["t1 t2", "t5"], max_tokens=6, temperature=1.0, seed=11)
    out = await _post(client, n=3, **body)
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 36
    for i, prompt in enumerate(body["prompt"]):
        for j in range(3):
            alone = await _post(client, **{**body, "prompt": prompt, "seed": 11 + j})
            assert out["choices"][i * 3 + j]["text"] == alone["choices"][0]["text"], (i, j)
    texts = [c["text"] for c in out["choices"][:3]]
    assert len(set(texts)) > 1  # independent samples (6 tokens of a 128-token vocabulary)
    chat = await _post(
        client,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "t3"}],
        max_tokens=4,
        n=2,
        seed=5,
    )
    alone = await _post(
        client, "/v1/chat/completions", messages=[{"role": "user", "content": "t3"}], max_tokens=4, seed=6
    )
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][1]["message"]["content"] == alone["choices"][0]["message"]["content"]
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "t3"}], "max_tokens": 4, "n": 2,
              "seed": 5, "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    chunks = [d for _, d in sse_json(response.text)[:-1]]
    for index in (0, 1):
        text = "".join(
            c["choices"][0]["delta"].get("content", "")
            for c in chunks
            if c["choices"] and c["choices"][0]["index"] == index
        )
        assert text == chat["choices"][index]["message"]["content"]
    assert chunks[-1]["usage"] == chat["usage"]


@pytest.mark.asyncio
async def test_logit_bias_steers_greedy_and_leaves_logprobs_raw(client):
    plain = await _post(client, prompt="t1 t2", max_tokens=3, temperature=0, logprobs=0)
    biased = await _post(
        client, prompt="t1 t2", max_tokens=3, temperature=0, logprobs=0, logit_bias={"77": 100}
    )
    assert biased["choices"][0]["logprobs"]["tokens"] == ["t77"] * 3
    first_plain = plain["choices"][0]["logprobs"]
    assert first_plain["tokens"][0] != "t77"
    # the reported log-probability is the model's own (before the bias): below the best token's
    assert biased["choices"][0]["logprobs"]["token_logprobs"][0] < first_plain["token_logprobs"][0]
    banned = await _post(
        client, prompt="t1 t2", max_tokens=3, temperature=0, logit_bias={first_plain["tokens"][0][1:]: -100}
    )
    assert not banned["choices"][0]["text"].startswith(" " + first_plain["tokens"][0])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"logit_bias": {"128": 1}}, "body.logit_bias.128"),
        ({"logit_bias": {"-1": 1}}, "body.logit_bias.-1"),
        ({"logit_bias": {"t5": 1}}, "body.logit_bias.t5"),
        ({"logit_bias": {"5": 101}}, "body.logit_bias.5"),
        ({"n": 2, "best_of": 3}, "body.best_of"),
        ({"n": 0}, "body.n"),
        ({"n": 16, "prompt": ["t1"] * 5}, "body.n"),
        ({"n": 2, "seed": 2**63 - 1}, "body.seed"),
    ],
)
async def test_n_best_of_logit_bias_errors(client, body, where):
    out = await _post(client, status=422, **{"prompt": "t1", **body})
    assert out["error"]["where"] == where, out


@pytest.mark.asyncio
async def test_native_generate_prompt_and_top_logprobs(client):
    """/generate: prompt_logprobs (the first null) equal the OpenAI route's echo scores, top_logprobs
    per generated token, max_new_tokens 0 scores only; streamed as event: prompt, then tokens."""
    body = {
        "prompt": "t5 t9 t17",
        "max_new_tokens": 3,
        "logprobs": True,
        "top_logprobs": 4,
        "prompt_logprobs": 2,
    }
    out = await _post(client, "/generate", **body)
    prompt = out["prompt_logprobs"]
    assert [p["token"] for p in prompt] == ["t5", "t9", "t17"] and [p["token_id"] for p in prompt] == [
        5,
        9,
        17,
    ]
    assert prompt[0]["logprob"] is None and prompt[0]["top_logprobs"] is None
    assert all(len(p["top_logprobs"]) == 2 for p in prompt[1:])
    echo = await _post(client, prompt="t5 t9 t17", echo=True, logprobs=2, max_tokens=0)
    want = echo["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert torch.allclose(torch.tensor([p["logprob"] for p in prompt[1:]]), torch.tensor(want), atol=1e-5)
    for entry in out["logprobs"]:
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert (
            entry["token_id"] == entry["top_logprobs"][0]["token_id"] or values[0] - entry["logprob"] < 1e-5
        )
    only = await _post(client, "/generate", prompt="t5 t9 t17", max_new_tokens=0, prompt_logprobs=0)
    assert (
        only["text"] == "" and only["finish_reason"] == "length" and only["usage"]["completion_tokens"] == 0
    )
    assert only["prompt_logprobs"][1]["top_logprobs"] is None
    response = await client.post("/generate", json={**body, "stream": True})
    events = sse_json(response.text)
    assert [n for n, _ in events] == ["prompt", "token", "token", "token", "done"]
    assert events[0][1]["prompt_logprobs"] == events[-1][1]["prompt_logprobs"]
    assert [len(d["top_logprobs"]) for n, d in events if n == "token"] == [4, 4, 4]
    bad = await _post(client, "/generate", status=422, prompt="t1", top_logprobs=2)
    assert bad["error"]["where"] == "body.top_logprobs"
