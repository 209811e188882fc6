"""Hostile field values mixed into a batch of well-formed requests, over HTTP (one failure stays
with its request).

The issue's case: ``top_k: 9223372036854775808`` raised inside sampling during a prefill, which
failed that request *and* the other users' requests admitted in the same step with a 500. Tried
as a new user would: the tiny random-weight app (in-process) with an admin and an inference key;
well-formed requests (native and OpenAI, streaming or not, greedy, seeded, logprobs) are sent all
at once together with hostile ones, and the engine is held until every request that reaches it
is queued, so they share one prefill:

* out-of-range values of every numeric field (``top_k`` over the vocabulary or int64,
  ``max_new_tokens`` / ``max_tokens`` negative or huge, seeds, temperatures, ``top_p``, ``n``,
  ``logprobs``, penalties, stop lists, NaN / Infinity) are 422 naming the field;
* temperatures and ``top_p`` that underflow float32 (``1e-45``, ``5e-324``, ``1e-46``) are greedy:
  the text equals the greedy text (it used to be token 0, i.e. empty text);
* an adapter that makes the model's scores NaN mid-generation (an injected forward) ends that
  request alone: 422 naming the adapter field, or an ``error`` event in a stream, and
  ``facet_request_errors_total{reason="non_finite"}`` counts it;
* every well-formed request is 200 with exactly the text it gets when sent alone.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import pytest_asyncio

from server.app import create_app
from server.engine.paged.generator import PagedGenerator
from tests.api.conftest import adapter_files, serve, sse_json, upload
from tests.api.tiny_server import BASE_NAME, build_tiny, tiny_settings
from tests.metrics.conftest import parse, value

pytestmark = pytest.mark.asyncio

ADMIN, INFER = "hostile-admin-key", "hostile-infer-key"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
POISON = "poison"  # its rows' scores turn NaN from the first decode step on
VOCAB = 128  # the tiny model's (tests/conftest.py); checked against the engine below
CHAT = [{"role": "user", "content": "t4 t5"}]
GREEDY = {"prompt": "t1 t2 t3", "max_new_tokens": 8}
GREEDY_V1 = {"model": BASE_NAME, "prompt": "t2 t4 t6", "max_tokens": 8, "temperature": 0}
SAMPLED = {"temperature": 0.9, "top_k": 40, "seed": 7}
V1, CHAT_V1 = {"model": BASE_NAME, "prompt": "t1"}, {"model": BASE_NAME, "messages": CHAT}

# (route, body): must come out exactly as when sent alone
WELL_FORMED = [
    ("/generate", GREEDY),
    ("/generate", {**SAMPLED, "prompt": "t9 t8 t7 t6 t5", "max_new_tokens": 12}),
    ("/generate", {"messages": CHAT, "max_new_tokens": 10, "logprobs": True}),
    ("/generate", {"prompt": "t3 t3 t3", "max_new_tokens": 6, "stream": True}),
    ("/generate", {**GREEDY, "temperature": 0.7, "top_k": VOCAB, "seed": 1}),  # top_k = vocabulary: fine
    ("/v1/completions", GREEDY_V1),
    ("/v1/completions", {**GREEDY_V1, "prompt": [[2, 4], [6, 8, 9]], "echo": True, "logprobs": 20}),
    ("/v1/chat/completions", {**CHAT_V1, "max_tokens": 6, "seed": 3}),
    ("/v1/chat/completions", {**CHAT_V1, "max_tokens": 5, "temperature": 0, "stream": True}),
]  # fmt: skip
# (route, body, the well-formed request whose greedy text it must equal)
UNDERFLOW = [
    ("/generate", {**GREEDY, "temperature": 1e-45, "seed": 5}, 0),
    ("/generate", {**GREEDY, "temperature": 5e-324}, 0),
    ("/generate", {**GREEDY, "temperature": 1.0, "top_p": 1e-45, "seed": 5}, 0),
    ("/generate", {**GREEDY, "temperature": 1.0, "top_p": 1e-46, "seed": 6}, 0),
    ("/v1/completions", {**GREEDY_V1, "temperature": 1.0, "top_p": 1e-45, "seed": 2}, 5),
    ("/v1/completions", {**GREEDY_V1, "temperature": 1e-300}, 5),
]
# (route, body, where): the engine's own finite check ends these, alone
POISONED = [
    ("/generate", {**GREEDY, "adapter": POISON}, "body.adapter"),
    ("/generate", {**GREEDY, "adapter": POISON, "stream": True}, "body.adapter"),
    ("/v1/completions", {**GREEDY_V1, "model": POISON}, "body.model"),
    ("/v1/chat/completions", {**CHAT_V1, "model": POISON, "max_tokens": 6, "stream": True}, "body.model"),
]  # fmt: skip
# (route, body, where of the 422)
REJECTED = [
    ("/generate", {**GREEDY, "top_k": 2**63}, "body.top_k"),
    ("/generate", {**GREEDY, "top_k": VOCAB + 1}, "body.top_k"),
    ("/generate", {**GREEDY, "top_k": 10**40}, "body.top_k"),
    ("/generate", {**GREEDY, "top_k": -1}, "body.top_k"),
    ("/generate", {**GREEDY, "max_new_tokens": -1}, "body.max_new_tokens"),
    ("/generate", {**GREEDY, "prompt_logprobs": 21}, "body.prompt_logprobs"),
    ("/generate", {**GREEDY, "max_new_tokens": 10**12}, "body.max_new_tokens"),
    ("/generate", {**GREEDY, "max_new_tokens": 8.5}, "body.max_new_tokens"),
    ("/generate", {**GREEDY, "seed": 2**64}, "body.seed"),
    ("/generate", {**GREEDY, "seed": -1}, "body.seed"),
    ("/generate", {**GREEDY, "temperature": 1e300}, "body.temperature"),
    ("/generate", {**GREEDY, "temperature": -1e-45}, "body.temperature"),
    ("/generate", {**GREEDY, "top_p": 0}, "body.top_p"),
    ("/generate", {**GREEDY, "top_p": -1e-45}, "body.top_p"),
    ("/generate", {**GREEDY, "top_p": 1.0000001}, "body.top_p"),
    ("/generate", {**GREEDY, "logprobs": 1}, "body.logprobs"),
    ("/generate", {**GREEDY, "stop": ["x"] * 17}, "body.stop"),
    ("/generate", {**GREEDY, "stop": ["x" * 257]}, "body.stop"),
    ("/v1/completions", {**V1, "top_k": 2**63}, "body.top_k"),
    ("/v1/completions", {**V1, "top_k": VOCAB + 1}, "body.top_k"),
    ("/v1/completions", {**V1, "max_tokens": 10**9}, "body.max_tokens"),
    ("/v1/completions", {**V1, "max_tokens": -5}, "body.max_tokens"),
    ("/v1/completions", {**V1, "n": 17}, "body.n"),
    ("/v1/completions", {**V1, "logprobs": 21}, "body.logprobs"),
    ("/v1/completions", {**V1, "prompt": [[1], [2, VOCAB]], "echo": True, "logprobs": 1}, "body.prompt.1.1"),
    ("/v1/completions", {**V1, "prompt": [2**63], "echo": True, "max_tokens": 0}, "body.prompt.0"),
    ("/v1/completions", {**V1, "presence_penalty": 1e308}, "body.presence_penalty"),
    ("/v1/completions", {**V1, "seed": 2**63}, "body.seed"),
    ("/v1/completions", {**V1, "best_of": 3}, "body.best_of"),
    ("/v1/chat/completions", {**CHAT_V1, "temperature": 2.5}, "body.temperature"),
    ("/v1/chat/completions", {**CHAT_V1, "top_k": VOCAB + 1}, "body.top_k"),
    ("/v1/chat/completions", {**CHAT_V1, "max_completion_tokens": 10**6}, "body.max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT_V1, "top_logprobs": 3}, "body.top_logprobs"),
    ("/v1/chat/completions", {**CHAT_V1, "frequency_penalty": -2.0}, "body.frequency_penalty"),
    ("/v1/chat/completions", {**CHAT_V1, "logit_bias": {"5": 1e9}}, "body.logit_bias"),
]
# (route, raw JSON text, the field): NaN / Infinity are not JSON; either the decoder or the field
# validator refuses them
NOT_JSON_NUMBERS = [
    ("/generate", '{"prompt": "t1", "temperature": NaN}', "body.temperature"),
    ("/generate", '{"prompt": "t1", "max_new_tokens": Infinity}', "body.max_new_tokens"),
    ("/generate", '{"prompt": "t1", "top_p": -Infinity}', "body.top_p"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "t1", "seed": NaN}', "body.seed"),
]  # fmt: skip


def poison_rows(forward):
    """``forward`` with NaN scores for the poisoned adapter's rows in decode steps (one token fed),
    as an adapter whose weights overflow would give."""

    def poisoned(input_ids, attention_mask, position_ids, cache, keys, **kw):
        logits = forward(input_ids, attention_mask, position_ids, cache, keys, **kw)
        rows = [i for i, key in enumerate(keys) if key is not None and key[0] == POISON]
        if rows and input_ids.shape[1] == 1:
            logits = logits.clone()
            logits[rows] = float("nan")
        return logits

    return poisoned


def poison_paged_rows(forward):
    """``poison_rows`` for the paged engine's forward: NaN scores for the poisoned adapter's decode
    rows (their packed position is one of the layout's decode rows)."""

    def poisoned(input_ids, position_ids, token_keys, logits_index, layout, also_resident):
        logits = forward(input_ids, position_ids, token_keys, logits_index, layout, also_resident)
        decode = set(range(layout.decodes))
        rows = [
            j
            for j, pos in enumerate(logits_index.tolist())
            if pos in decode and token_keys[pos] is not None and token_keys[pos][0] == POISON
        ]
        if rows:
            logits = logits.clone()
            logits[rows] = float("nan")
        return logits

    return poisoned


def hold_until_queued(generator, n: int, limit_s: float = 60.0) -> None:
    """The next step waits until ``n`` requests are queued, so that they share one prefill (only
    the batching depends on this; the verdicts hold either way)."""
    step = generator.step
    released = threading.Event()

    def held():
        if not released.is_set():
            deadline = time.monotonic() + limit_s
            while generator.num_waiting < n and time.monotonic() < deadline:
                time.sleep(0.005)
            released.set()
        return step()

    generator.step = held


@pytest_asyncio.fixture
async def server(tmp_path, tmp_path_factory):
    keys = [f"admin:{ADMIN}", f"infer:{INFER}"]
    settings = tiny_settings(data_dir=tmp_path / "data", api_keys=keys, max_batch_size=32)
    engine, store = build_tiny(settings)
    assert engine.base.vocab_size == VOCAB
    generator = engine.generator
    if isinstance(generator, PagedGenerator):
        generator.forward = poison_paged_rows(generator.forward)
    else:
        generator.forward = poison_rows(generator.forward)
        generator._running = generator._new_batch()  # the (empty) running batch holds the forward too
    app = create_app(settings, engine=engine, store=store)
    async with serve(app, headers={"Authorization": f"Bearer {INFER}"}) as client:
        config, weights = adapter_files(app, "lora", tmp_path_factory.mktemp("poison"), seed=3)
        response = await upload(client, POISON, config, weights, headers=ADMIN_H)
        assert response.status_code == 201, response.text
        yield client, generator


async def post(client: httpx.AsyncClient, route: str, body: dict | str) -> httpx.Response:
    if isinstance(body, str):
        return await client.post(route, content=body, headers={"content-type": "application/json"})
    return await client.post(route, json=body)


def text_of(route: str, body: dict, response: httpx.Response) -> str:
    """The completion's text, from a 200 answer of any route, streamed or not."""
    assert response.status_code == 200, (route, body, response.text)
    if not body.get("stream"):
        out = response.json()
        if route == "/generate":
            return out["text"]
        choice = out["choices"][0]
        return choice["text"] if route == "/v1/completions" else choice["message"]["content"]
    events = sse_json(response.text)
    assert all(not (isinstance(d, dict) and "error" in d) for _, d in events), events
    if route == "/generate":
        done = [d for name, d in events if name == "done"]
        tokens = [d["text"] for name, d in events if name == "token"]
        assert len(done) == 1 and "".join(tokens) == done[0]["text"]
        return done[0]["text"]
    assert events[-1][1] == "[DONE]"
    return "".join(d["choices"][0]["delta"].get("content", "") for _, d in events[:-1] if d["choices"])


def assert_poisoned(route: str, body: dict, where: str, response: httpx.Response) -> None:
    """422 naming the adapter field; in a stream (200 once started): an error event, no done."""
    if not body.get("stream"):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
    else:
        assert response.status_code == 200, response.text
        events = sse_json(response.text)
        if route == "/generate":
            assert [n for n, _ in events][-1] == "error" and "done" not in [n for n, _ in events]
            assert [n for n, _ in events].count("token") == 1  # the prefill's token, then NaN
        else:
            assert "[DONE]" not in [d for _, d in events]
        error = events[-1][1]["error"]
    assert error["type"] == "invalid_request" and error["where"] == where, error
    assert POISON in error["message"] and "NaN or inf" in error["message"], error


async def test_hostile_values_mixed_into_a_batch_fail_alone(server):
    client, generator = server
    alone = []
    for route, body in WELL_FORMED:  # references: each request on its own
        alone.append(text_of(route, body, await post(client, route, body)))
        assert alone[-1].strip(), (route, body)

    hold_until_queued(generator, len(WELL_FORMED) + len(UNDERFLOW) + len(POISONED))
    calls = [(r, b) for r, b in WELL_FORMED] + [(r, b) for r, b, _ in UNDERFLOW + POISONED]
    calls += [(r, b) for r, b, _ in REJECTED + NOT_JSON_NUMBERS]
    order = list(range(len(calls)))
    order = order[::2] + order[1::2]  # hostile and well-formed interleaved on the wire
    answers: list = [None] * len(calls)
    results = await asyncio.gather(*(post(client, *calls[i]) for i in order))
    for i, response in zip(order, results, strict=True):
        answers[i] = response

    groups = iter(answers)

    def next_answers(cases: list) -> list[httpx.Response]:
        return [next(groups) for _ in cases]

    for (route, body), ref, response in zip(WELL_FORMED, alone, next_answers(WELL_FORMED), strict=True):
        assert text_of(route, body, response) == ref, (route, body)
    for (route, body, same_as), response in zip(UNDERFLOW, next_answers(UNDERFLOW), strict=True):
        assert text_of(route, body, response) == alone[same_as], (route, body)
    for (route, body, where), response in zip(POISONED, next_answers(POISONED), strict=True):
        assert_poisoned(route, body, where, response)
    for (route, body, where), response in zip(REJECTED, next_answers(REJECTED), strict=True):
        assert response.status_code == 422, (route, body, response.text)
        assert response.json()["error"]["where"].startswith(where), (body, response.json())
    for (_, text, where), response in zip(NOT_JSON_NUMBERS, next_answers(NOT_JSON_NUMBERS), strict=True):
        assert response.status_code == 422, (text, response.text)
        assert response.json()["error"].get("where") in ("body", where), (text, response.json())

    samples = parse((await client.get("/metrics", headers=ADMIN_H)).text)
    errors = {r: value(samples, "facet_request_errors_total", reason=r) for r in generator.error_counts}
    assert errors == {**dict.fromkeys(generator.error_counts, 0.0), "non_finite": float(len(POISONED))}
    assert value(samples, "facet_generation_requests_total", finish_reason="error") == len(POISONED)
    assert all(response.status_code < 500 for response in answers)
    assert json.loads((await client.get("/ready")).text)["status"] == "ready"
