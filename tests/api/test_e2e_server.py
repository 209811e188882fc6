"""End to end: ``python -m server`` as ``make serve`` starts it, with the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import httpx
import pytest

from .processes import REPO, server_process

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def facet(tmp_path_factory):
    data = tmp_path_factory.mktemp("facet-e2e")
    env = {
        "FACET_DATA_DIR": str(data),
        "FACET_MODELS_DIR": str(REPO / "var" / "models"),
        "FACET_THREADS": "1",
        "FACET_DTYPE": "float32",  # pinned: `auto` picks by the CPU
    }
    with server_process("server", [], data / "server.log", env=env, timeout=300) as url:
        yield url


def test_generate_stream_and_openai_chat(facet):
    assert httpx.get(facet + "/ready").json() == {
        "status": "ready",
        "model": "smollm2-135m-instruct",
        "dtype": "float32",
        "device": "cpu",
    }

    body = {"messages": QUESTION, "max_new_tokens": 16, "temperature": 0}
    out = httpx.post(facet + "/generate", json=body, timeout=120).json()
    assert "Paris" in out["text"] and out["finish_reason"] in ("eos", "stop", "length")
    assert out["adapter"] is None and out["usage"]["completion_tokens"] >= 1

    tokens, done = [], None
    with httpx.stream("POST", facet + "/generate", json={**body, "stream": True}, timeout=120) as response:
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    tokens.append(data["text"])
                else:
                    done = data
    assert done is not None and "".join(tokens) == done["text"] == out["text"]

    chat = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    reply = httpx.post(facet + "/v1/chat/completions", json=chat, timeout=120).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert (
        reply["usage"]["total_tokens"]
        == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    )
