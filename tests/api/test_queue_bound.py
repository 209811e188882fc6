"""The waiting queue's bound holds exactly, including requests still loading their adapter.

A request is counted against ``max_queue`` from its admission on (``Generator.reserve``), through
its adapter load, to the generator's queue, exactly once: the ``facet_requests_waiting`` gauge
used to count a request twice between the submit thread's return and the event loop noticing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.engine.generator import Generator
from server.engine.requests import GenerationRequest, SamplingParams

from .conftest import adapter_files, serve, upload


def _gen(max_seq_len: int | None = None) -> Generator:
    def forward(*_a, **_k):  # never stepped in these tests
        raise AssertionError("no step expected")

    return Generator(forward, tokenizer=None, eos_token_ids=[], max_seq_len=max_seq_len)


def _request(n_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=list(range(1, n_tokens + 1)), params=SamplingParams())


def test_reserve_counts_each_request_once_until_it_is_queued_or_given_back():
    gen = _gen(max_seq_len=8)
    assert gen.reserve(2) is None and gen.reserve(2) is None
    assert gen.reserve(2) == 2 and gen.num_queued == 2  # full: nothing more reserved
    gen.submit(_request(), reserved=True)  # the place becomes a waiting request
    assert gen.num_waiting == 1 and gen.num_queued == 2
    gen.unreserve()  # e.g. its adapter failed to load
    assert gen.num_queued == 1 and gen.reserve(2) is None
    too_long = _request(20)  # rejected at submit: its place is given back too
    gen.submit(too_long, reserved=True)
    assert too_long.sink.drain()[-1].finish_reason == "error" and gen.num_queued == 1
    gen.submit(_request())  # unreserved submits are counted by the queue alone
    assert gen.num_waiting == gen.num_queued == 2


@pytest.mark.asyncio
async def test_requests_loading_their_adapter_count_against_max_queue_exactly(make_app, tmp_path):
    app = make_app(max_batch_size=1, max_queue=3)
    async with serve(app) as client:
        config, weights = adapter_files(app, "lora", tmp_path / "slow")
        assert (await upload(client, "slow", config, weights)).status_code == 201
        engine = app.state.runtime.engine
        release, loading = threading.Event(), threading.Semaphore(0)
        load = engine.residency.source

        def held_load(key):  # every load of the cold adapter waits for the test
            loading.release()
            assert release.wait(30)
            return load(key)

        engine.residency.source = held_load
        body = {"prompt": "t1 t2", "adapter": "slow", "max_new_tokens": 2}
        calls = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(8)]
        assert await asyncio.to_thread(loading.acquire, True, 30)  # the first load is held
        while sum(c.done() for c in calls) < 5:  # the other 5 are refused at once
            await asyncio.sleep(0.01)
        metrics = (await client.get("/metrics")).text
        waiting = [ln for ln in metrics.splitlines() if ln.startswith("facet_requests_waiting ")]
        assert waiting == ["facet_requests_waiting 3.0"], waiting  # 3 admitted, counted once each
        assert engine.generator.num_queued == 3
        release.set()
        codes = sorted(r.status_code for r in await asyncio.gather(*calls))
    assert codes == [200] * 3 + [429] * 5, codes
    assert engine.generator.num_queued == 0
