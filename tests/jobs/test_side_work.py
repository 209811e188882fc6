"""Fine-tunes are side work: they never hold what serving needs, and their memory is bounded.

* Training tokenises with its own tokenizer copy: while a submit is parked in the middle of
  tokenising its file (a gate inside the training tokenizer), a ``/generate`` completes, and the
  serving tokenizer lock is never taken by the training path.
* A micro-batch's tokens (batch_size x the longest example) are capped from a memory budget:
  beyond it, 422 naming the numbers, before anything is queued.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import LlamaConfig

from server.app import create_app
from server.jobs.memory import TokenBudget, estimate_bytes_per_token
from tests.api.conftest import serve
from tests.api.tiny_server import build_tiny, tiny_settings
from tests.jobs.test_api import BODY, app, wait_done  # noqa: F401 (fixture)

WAIT_S = 30.0  # hang guard only


class GatedTokenizer:
    """The training tokenizer, parked at its first ``encode`` until ``release`` is set."""

    def __init__(self, inner, entered: threading.Event, release: threading.Event):
        self._inner = inner
        self._entered = entered
        self._release = release
        self.calls = 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        if not self._entered.is_set():
            self._entered.set()
            assert self._release.wait(WAIT_S), "the test never released the training tokenizer"
        return self._inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class CountingLock:
    """The serving tokenizer lock, counting how often it is taken."""

    def __init__(self, inner):
        self._inner = inner
        self.taken = 0

    def __enter__(self):
        self.taken += 1
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


@pytest.mark.asyncio
async def test_generate_completes_while_a_training_file_is_being_tokenised(app):  # noqa: F811
    async with serve(app) as client:
        rt = app.state.runtime
        runner = rt.jobs
        assert runner.tokenizer is not rt.engine.base.tokenizer  # training has its own copy
        entered, release = threading.Event(), threading.Event()
        runner.tokenizer = gated = GatedTokenizer(runner.tokenizer, entered, release)
        rt.tokenizer_lock = serving_lock = CountingLock(rt.tokenizer_lock)
        records = [
            {"prompt": f"t{1 + i % 90} t{2 + i % 90}", "completion": f"t{3 + i % 90}"} for i in range(500)
        ]
        submit = asyncio.create_task(client.post("/fine-tunes", json={**BODY, "training_data": records}))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S)
            # The submit is parked inside its tokenisation (holding whatever lock it tokenises
            # under) until released: a generation that needed that lock could not finish.
            gen = await asyncio.wait_for(
                client.post("/generate", json={"prompt": "t1 t2", "max_new_tokens": 2}), WAIT_S
            )
            assert gen.status_code == 200, gen.text
            assert not submit.done()
        finally:
            release.set()
        response = await submit
        assert response.status_code == 202, response.text
        done = await wait_done(client, response.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        # Submit and job start tokenised the 500 records (twice), never under the serving lock:
        # it was taken exactly once, for the /generate prompt.
        assert gated.calls >= 2 * len(records)
        assert serving_lock.taken == 1


@pytest.mark.asyncio
async def test_a_micro_batch_over_the_token_budget_is_422_naming_the_numbers(tmp_path):
    # 1 MiB at 16 KiB per token: 64 tokens per micro-batch.
    settings = tiny_settings(
        data_dir=tmp_path / "data", finetune_memory_bytes=1 << 20, finetune_bytes_per_token=1 << 14
    )
    engine, store = build_tiny(settings)
    capped = create_app(settings, engine=engine, store=store)
    prompt = " ".join(f"t{1 + i}" for i in range(10))  # 10 prompt tokens + 2 completion tokens
    records = [{"prompt": prompt, "completion": "t40 t41"} for _ in range(8)]
    async with serve(capped) as client:
        capped.state.runtime.jobs.stop()  # nothing needs to train here
        fits = {**BODY, "training_data": records[:4], "validation_data": None}
        fits["hyperparameters"] = {"max_steps": 1, "batch_size": 8}
        ok = await client.post("/fine-tunes", json=fits)  # 4 examples x 12 tokens = 48 <= 64
        assert ok.status_code == 202, ok.text

        over = await client.post("/fine-tunes", json={**fits, "adapter_id": "big", "training_data": records})
        assert over.status_code == 422, over.text
        error = over.json()["error"]
        assert error["where"] == "body.hyperparameters.batch_size"
        assert "96 tokens" in error["message"] and "64 tokens" in error["message"]  # 8 x 12 > 64
        assert "finetune_memory_bytes" in error["message"]

        smaller = {**fits, "adapter_id": "big", "training_data": records}
        smaller["hyperparameters"] = {"max_steps": 1, "batch_size": 4, "grad_accum": 2}
        assert (await client.post("/fine-tunes", json=smaller)).status_code == 202
        assert (await client.get("/fine-tunes")).json()["total"] == 2


def test_the_per_token_estimate_matches_the_smollm2_measurement():
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    per_token = estimate_bytes_per_token(smollm2, torch.float32)
    assert 1.5e6 <= per_token <= 1.75e6  # ~1.6 MB per token was measured
    assert estimate_bytes_per_token(smollm2, torch.bfloat16) * 2 == per_token
    budget = TokenBudget(memory_bytes=4 << 30, bytes_per_token=per_token)
    assert budget.max_tokens == (4 << 30) // per_token
