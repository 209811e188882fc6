"""The paged KV cache over HTTP: its metrics move with traffic; a prompt larger than it is a 422."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.conftest import serve

from .conftest import scrape, value


@pytest.mark.asyncio
async def test_prefix_cache_metrics_count_a_repeated_prompt(make_app):
    app = make_app(kv_block_size=2)
    async with serve(app) as client:
        body = {"prompt": "t1 t2 t3 t4 t5 t6 t7 t8 t9", "max_new_tokens": 2}
        before = await scrape(client)
        for _ in range(2):
            assert (await client.post("/generate", json=body)).status_code == 200
        after = await _settled(client)
    stats = app.state.runtime.engine.kv_stats()
    assert stats.hit_blocks > 0  # the second request found the first one's full blocks
    for name, expected in (
        ("facet_prefix_cache_hit_blocks_total", stats.hit_blocks),
        ("facet_prefix_cache_queried_blocks_total", stats.queried_blocks),
        ("facet_prefix_cache_blocks", stats.cached_blocks),
        ("facet_kv_cache_capacity_bytes", stats.capacity_bytes),
    ):
        assert value(after, name) == expected, name
    assert value(before, "facet_prefix_cache_hit_blocks_total") == 0
    assert value(after, "facet_kv_cache_bytes_in_use") == 0  # nothing running: every block given back
    assert value(after, "facet_kv_cache_usage_ratio") == 0


@pytest.mark.asyncio
async def test_a_prompt_longer_than_the_kv_cache_is_a_422_naming_both_numbers(make_app):
    probe = make_app()
    app = make_app(kv_block_size=2, kv_cache_bytes=_bytes_for_tokens(probe.state.runtime.engine, 8))
    assert app.state.runtime.engine.generator.capacity_tokens == 8
    async with serve(app) as client:
        prompt = " ".join(f"t{i}" for i in range(1, 13))
        response = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": 2})
        assert response.status_code == 422, response.text
        n = len(app.state.runtime.engine.base.tokenizer(prompt)["input_ids"])
        assert f"prompt has {n} tokens; the KV cache holds at most 8 tokens" in response.text
        ok = await client.post("/generate", json={"prompt": "t1 t2", "max_new_tokens": 2})
        assert ok.status_code == 200, ok.text


async def _settled(client, timeout: float = 10.0):
    """A scrape once the engine thread has given every block back (a response may end before
    the step that finished it does)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(client)
        if value(samples, "facet_kv_cache_bytes_in_use") == 0 or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.02)


def _bytes_for_tokens(engine, n: int) -> int:
    from server.engine.paged.attention import PagedKV
    from server.engine.paged.build import kv_geometry

    model = engine.base.model
    dtype = next(model.parameters()).dtype
    return n * PagedKV.bytes_per_token(*kv_geometry(model.config), dtype)
