"""POST /generate: results, streaming, sampling options and every documented error."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import server.app as app_module

from .conftest import adapter_files, serve, sse_json, upload, wait_ready

pytestmark = pytest.mark.asyncio

PROMPT = "t1 t2 t3 t4"


async def generate(client, **body):
    response = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def test_greedy_generation_reports_usage_and_is_deterministic(client):
    first = await generate(client)
    assert first["adapter"] is None and first["adapter_version"] is None
    assert first["finish_reason"] == "length"
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 8}
    assert first["text"].strip() and first["logprobs"] is None
    assert await generate(client) == first


async def test_messages_go_through_the_chat_template(client):
    by_prompt = await generate(client, prompt="t5 t6")
    response = await client.post(
        "/generate", json={"messages": [{"role": "user", "content": "t5 t6"}], "max_new_tokens": 8}
    )
    assert response.status_code == 200, response.text
    assert response.json()["text"] == by_prompt["text"]  # the tiny template renders "t5 t6 "


async def test_logprobs_per_token(client):
    out = await generate(client, logprobs=True)
    assert len(out["logprobs"]) == out["usage"]["completion_tokens"]
    assert all(lp["logprob"] <= 0 and isinstance(lp["token_id"], int) for lp in out["logprobs"])
    assert "".join(" " + lp["token"] for lp in out["logprobs"]) == out["text"]


async def test_stop_string_cuts_the_text(client):
    full = (await generate(client))["text"]
    stop = full.split()[2]
    out = await generate(client, stop=[stop])
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[: full.index(" " + stop) + 1]


async def test_seeded_sampling_is_reproducible(client):
    a = await generate(client, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    b = await generate(client, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert a["text"] == b["text"]


async def test_stream_events_concatenate_to_the_final_text(client):
    response = await client.post(
        "/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "stream": True, "logprobs": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_json(response.text)
    tokens = [data for name, data in events if name == "token"]
    assert [name for name, _ in events] == ["token"] * 8 + ["done"]
    done = events[-1][1]
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == len(tokens)
    assert [t["logprob"] for t in tokens] == [lp["logprob"] for lp in done["logprobs"]]
    assert done["text"] == (await generate(client))["text"]


BAD_BODIES = [
    ({"prompt": ""}, "body.prompt"),
    ({"prompt": "   \n"}, "body.prompt"),
    ({"prompt": None}, "body.prompt"),
    ({"prompt": "t1", "messages": [{"role": "user", "content": "t1"}]}, "body.prompt"),
    ({"prompt": "t1", "max_new_tokens": -1}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": -1}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": 2**31}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": "10"}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": 3.5}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": None}, "body.max_new_tokens"),
    ({"prompt": "t1", "max_new_tokens": True}, "body.max_new_tokens"),
    ({"prompt": "t1", "temperature": -1}, "body.temperature"),
    ({"prompt": "t1", "temperature": 1e9}, "body.temperature"),
    ({"prompt": "t1", "top_p": 0}, "body.top_p"),
    ({"prompt": "t1", "top_p": 1.5}, "body.top_p"),
    ({"prompt": "t1", "top_k": -5}, "body.top_k"),
    ({"prompt": "t1", "seed": -1}, "body.seed"),
    ({"prompt": "t1", "stop": [""]}, "body.stop.0"),
    ({"prompt": "t1", "stop": ["x"] * 17}, "body.stop"),
    ({"prompt": "t1", "stop": "x" * 257}, "body.stop.0"),
    ({"prompt": "t1", "logprobs": "yes"}, "body.logprobs"),
    ({"prompt": "t1", "best_of": 2}, "body.best_of"),
    ({"prompt": "t1", "adapter": "../../etc/passwd"}, "body.adapter"),
    ({"prompt": "t1", "adapter": "/abs/path"}, "body.adapter"),
    ({"prompt": "t1", "adapter": "a..b"}, "body.adapter"),
    ({"prompt": "t1", "adapter": "http://169.254.169.254/"}, "body.adapter"),
    ({"prompt": "t1", "adapter": "bad\x00id"}, "body.adapter"),
    ({"prompt": "t1", "adapter": "x" * 10_000}, "body.adapter"),
    ({"prompt": "t1", "adapter": "аdapter"}, "body.adapter"),  # Cyrillic a
    ({"messages": []}, "body.messages"),
    ({"messages": [{"role": "user"}]}, "body.messages.0.content"),
]


@pytest.mark.parametrize(("body", "where"), BAD_BODIES)
async def test_bad_input_is_422_naming_the_field(client, body, where):
    response = await client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["where"] == where and error["message"]
    await generate(client)  # still serving


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "t1", "temperature": NaN}', b"[" * 100_000])
async def test_malformed_json_is_a_4xx_error(client, raw):
    response = await client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert set(response.json()["error"]) >= {"type", "message"}


async def test_body_over_the_cap_is_413(make_app):
    async with serve(make_app(max_body_bytes=4096)) as client:
        big = {"prompt": "t1 " * 5000}
        response = await client.post("/generate", json=big)
        assert response.status_code == 413
        assert response.json()["error"] == {
            "type": "payload_too_large",
            "message": "request body exceeds 4096 bytes",
            "where": "body",
        }

        async def chunks():  # no Content-Length: the cap applies while the body streams in
            for _ in range(100):
                yield b"t1 " * 100

        response = await client.post(
            "/generate", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
        assert (await client.get("/health")).status_code == 200


async def test_prompt_and_max_new_tokens_caps_are_422(make_app):
    async with serve(make_app(max_prompt_tokens=8, max_new_tokens=32)) as client:
        response = await client.post("/generate", json={"prompt": "t1 " * 9})
        assert response.status_code == 422
        assert response.json()["error"]["where"] == "body.prompt"
        assert "max_prompt_tokens" in response.json()["error"]["message"]
        response = await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 33})
        assert response.status_code == 422 and response.json()["error"]["where"] == "body.max_new_tokens"
        ok = await client.post("/generate", json={"prompt": "t1 " * 8, "max_new_tokens": 32})
        assert ok.status_code == 200


async def test_prompt_beyond_the_model_context_is_422(client):
    response = await client.post("/generate", json={"prompt": "t1 " * 256})  # tiny model: 256 positions
    assert response.status_code == 422
    assert response.json()["error"]["where"] == "body.prompt"
    assert "context" in response.json()["error"]["message"]


async def test_unknown_adapter_is_404(client):
    response = await client.post("/generate", json={"prompt": "t1", "adapter": "no-such-adapter"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "type": "not_found",
        "message": "no adapter with this id",
        "where": "body.adapter",
    }


async def test_full_queue_answers_429_with_retry_after(make_app):
    app = make_app(max_queue=1, retry_after_s=3)
    async with serve(app) as client:
        generator = app.state.runtime.engine.generator
        gate = threading.Event()
        step = generator.step
        generator.step = lambda: (gate.wait(10), step())[1]  # the engine stalls: requests wait
        try:
            first = asyncio.create_task(client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2}))
            while generator.num_waiting < 1:
                await asyncio.sleep(0.01)
            response = await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2})
            assert response.status_code == 429
            assert response.headers["retry-after"] == "3"
            assert response.json()["error"]["type"] == "overloaded"
        finally:
            gate.set()
        assert (await first).status_code == 200
        assert (await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2})).status_code == 200


async def test_not_ready_until_warmed_up_and_while_shutting_down(make_app, monkeypatch):
    gate = threading.Event()
    warm_up = app_module._warm_up
    monkeypatch.setattr(app_module, "_warm_up", lambda engine: (gate.wait(10), warm_up(engine)))
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://facet.test") as client:
        async with app.router.lifespan_context(app):
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["error"]["type"] == "not_ready"
            assert (await client.get("/health")).status_code == 200
            response = await client.post("/generate", json={"prompt": "t1"})
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            gate.set()
            await wait_ready(client)
            assert (await client.get("/ready")).json() == {
                "status": "ready",
                "model": "tiny-llama",
                "dtype": "float32",
                "device": "cpu",
            }
        response = await client.get("/ready")  # lifespan over: shutting down
        assert response.status_code == 503 and "shutting down" in response.json()["error"]["message"]
        assert (await client.post("/generate", json={"prompt": "t1"})).status_code == 503


async def test_failed_start_up_reports_503_and_calls_back(make_app, monkeypatch):
    def broken(engine):
        raise RuntimeError("/secret/path/model.bin exploded")

    monkeypatch.setattr(app_module, "_warm_up", broken)
    app = make_app()
    failed = asyncio.Event()
    app_module.on_startup_failure(app, failed.set)
    async with serve(app, ready=False) as client:
        await asyncio.wait_for(failed.wait(), 10)
        response = await client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["message"] == "start-up failed; see the server log"


async def test_unexpected_errors_are_a_generic_500(client):
    engine = client.app.state.runtime.engine

    def broken(*args, **kwargs):
        raise RuntimeError("/home/someone/secret.txt token=abc123")

    engine.submit_many = broken
    response = await client.post("/generate", json={"prompt": "t1"})
    assert response.status_code == 500
    assert response.json() == {"error": {"type": "internal_error", "message": "internal server error"}}


async def test_unknown_route_and_wrong_method_use_the_error_shape(client):
    response = await client.get("/no/such/route")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    response = await client.get("/generate")
    assert response.status_code == 405 and response.json()["error"]["type"] == "method_not_allowed"


async def test_openapi_docs_are_served(client):
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/adapters"):
        assert path in paths


async def test_no_device_room_because_of_pinned_adapters_is_503_with_retry_after(client, tmp_path):
    """A request that can never fit while the device budget is full of pinned adapters is told to
    retry later (503), not given a 500; the pinned adapter keeps serving."""
    for i, name in enumerate(("pinned", "other")):
        config, weights = adapter_files(client.app, "lora", tmp_path / name, seed=i + 1)
        assert (await upload(client, name, config, weights)).status_code == 201
    engine = client.app.state.runtime.engine
    engine.pin("pinned")
    assert (await client.post("/generate", json={"prompt": "t1", "adapter": "pinned"})).status_code == 200
    engine.residency.device_bytes = engine.residency.device_used  # exactly full of the pinned one
    response = await client.post("/generate", json={"prompt": "t1", "adapter": "other"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] and "device adapter budget" in response.json()["error"]["message"]
    assert (await client.post("/generate", json={"prompt": "t1", "adapter": "pinned"})).status_code == 200


async def test_a_wedged_engine_turns_ready_503_and_new_requests_503_until_it_moves_again(make_app):
    """The engine thread is alive but a step never ends (e.g. a hung kernel): after
    ``engine_stall_s`` /ready and new requests answer 503 at once instead of hanging; /health
    stays 200; when the step finishes, everything is served again."""
    app = make_app(engine_stall_s=0.5)
    async with serve(app) as client:
        generator = app.state.runtime.engine.generator
        release = threading.Event()
        forward = generator.forward

        def wedged(*args, **kwargs):
            release.wait(30)
            return forward(*args, **kwargs)

        generator.forward = wedged
        stuck = asyncio.create_task(client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (ready := await client.get("/ready")).status_code == 200:
            assert loop.time() < deadline, "the stall was never reported"
            await asyncio.sleep(0.1)
        assert ready.status_code == 503 and "no progress" in ready.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200
        # answered while the step is still wedged (release is set below): refused, not queued
        late = await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2})
        assert late.status_code == 503 and late.headers["Retry-After"]
        generator.forward = forward
        release.set()
        assert (await stuck).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        assert (await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 2})).status_code == 200
