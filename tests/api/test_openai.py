"""OpenAI-compatible routes: shapes over ASGI, and OpenAI's own Python client against a real server."""

from __future__ import annotations

import pytest

from server.engine.loader import wrap_model
from tests.conftest import make_tiny_llama, make_tokenizer

from .conftest import ADMIN_KEY, INFER_KEY, adapter_files, sse_json, upload
from .tiny_server import TARGETS

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "t4 t5 t6"}]


async def _post(client, path, **body):
    response = await client.post(path, json={"model": "tiny-llama", **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.asyncio
async def test_completions_shape_and_greedy_equals_native(client):
    out = await _post(client, "/v1/completions", prompt="t1 t2 t3", max_tokens=6, temperature=0)
    assert (
        out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny-llama"
    )
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    native = await client.post("/generate", json={"prompt": "t1 t2 t3", "max_new_tokens": 6})
    assert choice["text"] == native.json()["text"]
    listed = await _post(client, "/v1/completions", prompt=["t1 t2 t3"], max_tokens=6, temperature=0)
    assert listed["choices"][0]["text"] == choice["text"]


@pytest.mark.asyncio
async def test_completions_stream_and_logprobs(client):
    full = await _post(client, "/v1/completions", prompt="t1 t2", max_tokens=5, temperature=0, logprobs=0)
    logprobs = full["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert logprobs["text_offset"][0] == 0
    response = await client.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": "t1 t2",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = [data for _, data in sse_json(response.text)]
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.asyncio
async def test_chat_completions_and_stream(client):
    out = await _post(
        client, "/v1/chat/completions", messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["content"]) == 6
    native = await client.post("/generate", json={"messages": CHAT, "max_new_tokens": 6})
    assert choice["message"]["content"] == native.json()["text"]

    parts = [{"type": "text", "text": "t4 t5"}, {"type": "text", "text": " t6"}]
    by_parts = await _post(
        client,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": parts}],
        max_tokens=6,
        temperature=0,
    )
    assert by_parts["choices"][0]["message"]["content"] == choice["message"]["content"]

    response = await client.post(
        "/v1/chat/completions",
        json={"model": "tiny-llama", "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True},
    )
    events = [data for _, data in sse_json(response.text)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]


@pytest.mark.asyncio
async def test_models_and_adapters_as_models(client, tmp_path):
    config, weights = adapter_files(client.app, "surm", tmp_path / "s")
    assert (await upload(client, "surm-x", config, weights)).status_code == 201
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny-llama", "surm-x"]
    assert listing["data"][1]["parent"] == "tiny-llama"
    assert (await client.get("/v1/models/surm-x")).json()["id"] == "surm-x"
    assert (await client.get("/v1/models/tiny-llama")).json()["owned_by"] == "facet"
    assert (await client.get("/v1/models/nope")).status_code == 404

    base = await _post(
        client, "/v1/chat/completions", messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    adapted = await _post(
        client,
        "/v1/chat/completions",
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        model="surm-x",
    )
    assert adapted["model"] == "surm-x"
    assert adapted["choices"][0]["logprobs"] != base["choices"][0]["logprobs"]


BAD = [
    ("/v1/completions", {"model": "nope", "prompt": "t1"}, 404, "body.model"),
    ("/v1/completions", {"model": "../etc/passwd", "prompt": "t1"}, 422, "body.model"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": ""}, 422, "body.prompt"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "n": 17}, 422, "body.n"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "echo": 1}, 422, "body.echo"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "max_tokens": -1}, 422, "body.max_tokens"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "max_tokens": 10**6}, 422, "body.max_tokens"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "temperature": 3}, 422, "body.temperature"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "t1", "logprobs": 21}, 422, "body.logprobs"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": []}, 422, "body.messages"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": CHAT, "presence_penalty": 1}, 422, None),
    (
        "/v1/chat/completions",
        {"model": "tiny-llama", "messages": CHAT, "top_logprobs": 3},
        422,
        "body.top_logprobs",
    ),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": CHAT, "tools": [{}]}, 422, "body.tools"),
    ("/v1/chat/completions", {"messages": CHAT}, 422, "body.model"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "body", "status", "where"), BAD)
async def test_openai_errors(client, path, body, status, where):
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (where is None or error["where"] == where)


# ------------------------------------------------------------- OpenAI's client, real HTTP server


@pytest.fixture(scope="module")
def oai(tiny_server):
    return openai.OpenAI(base_url=tiny_server + "/v1", api_key=INFER_KEY, max_retries=0)


def test_openai_client_completions(oai):
    out = oai.completions.create(model="tiny-llama", prompt="t1 t2 t3", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    stream = oai.completions.create(
        model="tiny-llama", prompt="t1 t2 t3", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == out.choices[0].text


def test_openai_client_chat(oai):
    out = oai.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0)
    text = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and text.strip()
    stream = oai.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 6


def test_openai_client_models_adapters_and_errors(oai, tiny_server, tmp_path):
    import httpx

    base = wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)
    config, weights = adapter_files(base, "hut", tmp_path / "h", seed=5)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    response = httpx.post(
        tiny_server + "/adapters",
        data={"adapter_id": "oai-hut"},
        files=files,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    admin = openai.OpenAI(base_url=tiny_server + "/v1", api_key=ADMIN_KEY, max_retries=0)
    assert {"tiny-llama", "oai-hut"} <= {m.id for m in admin.models.list()}
    # An infer key is not shown adapter ids (docs/api.md), but may name one it was given.
    assert [m.id for m in oai.models.list()] == ["tiny-llama"]
    assert oai.models.retrieve("oai-hut").id == "oai-hut"
    out = oai.chat.completions.create(model="oai-hut", messages=CHAT, max_tokens=4, temperature=0)
    assert out.model == "oai-hut" and out.usage.completion_tokens == 4

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-adapter", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=2, n=17)
    bad_key = openai.OpenAI(base_url=tiny_server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
