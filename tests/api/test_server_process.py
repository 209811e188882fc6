"""Real HTTP: the tiny app in a uvicorn subprocess, and client disconnects cancelling generation."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from server.engine.loader import wrap_model
from tests.conftest import make_tiny_llama, make_tokenizer

from .conftest import ADMIN_KEY, INFER_KEY, adapter_files
from .processes import server_thread
from .tiny_server import TARGETS

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
INFER = {"Authorization": f"Bearer {INFER_KEY}"}


def test_subprocess_server_over_http(tiny_server, tmp_path):
    assert httpx.get(tiny_server + "/health").json() == {"status": "ok"}
    assert httpx.get(tiny_server + "/ready").json() == {
        "status": "ready",
        "model": "tiny-llama",
        "dtype": "float32",
        "device": "cpu",
    }
    assert httpx.post(tiny_server + "/generate", json={"prompt": "t1"}).status_code == 401

    body = {"prompt": "t7 t8 t9", "max_new_tokens": 6}
    plain = httpx.post(tiny_server + "/generate", json=body, headers=INFER).json()
    assert plain["usage"] == {"prompt_tokens": 3, "completion_tokens": 6}

    events = []
    with httpx.stream("POST", tiny_server + "/generate", json={**body, "stream": True}, headers=INFER) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert [n for n, _ in events] == ["token"] * 6 + ["done"]
    assert "".join(d["text"] for n, d in events if n == "token") == plain["text"] == events[-1][1]["text"]

    base = wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)
    config, weights = adapter_files(base, "ether", tmp_path / "e")
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    response = httpx.post(
        tiny_server + "/adapters", data={"adapter_id": "proc-ether"}, files=files, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    out = httpx.post(tiny_server + "/generate", json={**body, "adapter": "proc-ether"}, headers=INFER).json()
    assert out["adapter"] == "proc-ether" and out["adapter_version"] == 1
    listed = httpx.get(tiny_server + "/adapters", headers=ADMIN).json()
    assert "proc-ether" in [a["adapter_id"] for a in listed["adapters"]]  # the server is shared
    info = httpx.get(tiny_server + "/adapters/proc-ether", headers=ADMIN).json()
    assert info["residency"][:2] == ["disk", "host"]


@pytest.fixture
def slow_server(make_app):
    """The tiny app under uvicorn in this process, its engine slowed to ~20 ms a step, every
    submitted request recorded."""
    app = make_app()
    with server_thread(app) as url:
        engine = app.state.runtime.engine
        submitted = []
        submit_many, step = engine.submit_many, engine.generator.step

        def recording_submit(*args, **kwargs):
            submitted.extend(reqs := submit_many(*args, **kwargs))
            return reqs

        engine.submit_many = recording_submit
        engine.generator.step = lambda: (time.sleep(0.02), step())[1]
        yield url, engine, submitted


def _wait_finished(req, engine, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not req.finished or engine.generator.num_running:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.01)


BODY = {"prompt": "t1 t2", "max_new_tokens": 200}  # ~4 s at 20 ms a step


def test_non_streaming_client_disconnect_cancels(slow_server):
    url, engine, submitted = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json=BODY, timeout=0.5)
    (req,) = submitted
    _wait_finished(req, engine, 1.5)
    assert req.cancelled


def test_streaming_client_disconnect_cancels(slow_server):
    url, engine, submitted = slow_server
    with httpx.stream("POST", url + "/generate", json={**BODY, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one token received: hang up
    (req,) = submitted
    _wait_finished(req, engine, 1.5)
    assert req.cancelled


def test_openai_stream_disconnect_cancels(slow_server):
    url, engine, submitted = slow_server
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "t1"}], "max_tokens": 200}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        next(response.iter_lines())
    (req,) = submitted
    _wait_finished(req, engine, 1.5)
    assert req.cancelled
