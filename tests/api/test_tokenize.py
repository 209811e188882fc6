"""POST /tokenize and /detokenize (vLLM's shape): round trips, the chat template, the same ids the
generation routes use, token-id checks and scopes."""

from __future__ import annotations

import pytest

from .conftest import serve


async def _post(client, path, status=200, **body):
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


@pytest.mark.asyncio
async def test_tokenize_detokenize_round_trip(client):
    out = await _post(client, "/tokenize", prompt="t1 t2 t90", add_special_tokens=True)
    assert out == {"tokens": [1, 2, 90], "count": 3, "max_model_len": 256}
    assert await _post(client, "/detokenize", tokens=out["tokens"]) == {"prompt": "t1 t2 t90"}
    assert (await _post(client, "/tokenize", prompt=""))["count"] == 0
    ids = [5, 127, 0, 64]
    text = (await _post(client, "/detokenize", tokens=ids, model="tiny-llama"))["prompt"]
    assert (await _post(client, "/tokenize", prompt=text))["tokens"] == ids


@pytest.mark.asyncio
async def test_tokenize_counts_what_generation_counts(client):
    messages = [{"role": "user", "content": "t4 t5"}, {"role": "assistant", "content": "t6"}]
    chat = await _post(client, "/tokenize", messages=messages)
    assert chat["tokens"] == [4, 5, 6]  # the tiny template joins the contents
    done = await _post(
        client, "/v1/chat/completions", model="tiny-llama", messages=messages, max_tokens=1, temperature=0
    )
    assert done["usage"]["prompt_tokens"] == chat["count"]
    text = await _post(client, "/tokenize", prompt="t7 t8 t9 t10")
    by_ids = await _post(client, "/v1/completions", model="tiny-llama", prompt=text["tokens"], max_tokens=1)
    by_text = await _post(client, "/v1/completions", model="tiny-llama", prompt="t7 t8 t9 t10", max_tokens=1)
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == text["count"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/tokenize", {}, "body.prompt"),
        ("/tokenize", {"prompt": "t1", "messages": [{"role": "user", "content": "t1"}]}, "body.prompt"),
        ("/tokenize", {"prompt": "t1", "add_special_tokens": "yes"}, "body.add_special_tokens"),
        ("/tokenize", {"messages": []}, "body.messages"),
        ("/tokenize", {"prompt": "t1", "extra": 1}, "body.extra"),
        ("/detokenize", {"tokens": [1, 128]}, "body.tokens.1"),
        ("/detokenize", {"tokens": [-1]}, "body.tokens.0"),
        ("/detokenize", {"tokens": [2**64]}, "body.tokens.0"),
        ("/detokenize", {"tokens": [True]}, "body.tokens.0"),
        ("/detokenize", {}, "body.tokens"),
    ],
)
async def test_tokenize_errors_name_the_field(client, path, body, where):
    out = await _post(client, path, status=422, **body)
    assert out["error"]["where"] == where, out


@pytest.mark.asyncio
async def test_tokenize_needs_an_infer_key(make_app):
    app = make_app(api_keys=["infer:tok-infer", "admin:tok-admin"])
    async with serve(app) as client:
        assert (await client.post("/tokenize", json={"prompt": "t1"})).status_code == 401
        for key in ("tok-infer", "tok-admin"):
            headers = {"Authorization": f"Bearer {key}"}
            response = await client.post("/detokenize", json={"tokens": [1]}, headers=headers)
            assert response.status_code == 200 and response.json() == {"prompt": "t1"}
