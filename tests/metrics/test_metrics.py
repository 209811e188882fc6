"""``GET /metrics``: exact counts after known traffic, bounded label cardinality, gauges, auth."""

from __future__ import annotations

import asyncio
import random
import string
import time

import httpx
import pytest

from tests.api.conftest import adapter_files, serve, upload
from tests.api.processes import server_thread

from .conftest import parse, scrape, value

GEN = {"prompt": "t1 t2 t3", "max_new_tokens": 3}


async def _upload(client, app, adapter_id: str, folder, family: str = "lora", seed: int = 0) -> None:
    config, weights = adapter_files(app, family, folder, seed=seed)
    response = await upload(client, adapter_id, config, weights)
    assert response.status_code == 201, response.text


async def _settled(client, timeout: float = 5.0):
    """A scrape once the engine is idle (the last step may still be ending after a response)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(client)
        idle = value(samples, "facet_requests_running") == 0 and value(samples, "facet_requests_waiting") == 0
        if idle or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_counters_move_by_exactly_the_traffic(make_app, tmp_path):
    app = make_app()
    async with serve(app) as client:
        await _upload(client, app, "known", tmp_path / "a")
        before = await _settled(client)
        k_base, k_adapter, v, u = 3, 2, 2, 4
        for _ in range(k_base):
            assert (await client.post("/generate", json=GEN)).status_code == 200
        for _ in range(k_adapter):
            response = await client.post("/generate", json={**GEN, "adapter": "known"})
            assert response.status_code == 200, response.text
        for i in range(v):  # an invalid field (schema), prompt and messages both (the handler)
            both = {**GEN, "messages": [{"role": "user", "content": "t1"}]}
            bad = {**GEN, "max_new_tokens": -1} if i % 2 == 0 else both
            assert (await client.post("/generate", json=bad)).status_code == 422
        for i in range(u):
            response = await client.post("/generate", json={**GEN, "adapter": f"missing-{i}"})
            assert response.status_code == 404
        after = await _settled(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    k = k_base + k_adapter
    route = {"route": "/generate", "method": "POST"}
    assert delta("facet_requests_total", **route, status="200") == k
    assert delta("facet_requests_total", **route, status="422") == v
    assert delta("facet_requests_total", **route, status="404") == u
    assert delta("facet_request_duration_seconds_count", route="/generate") == k + v + u
    assert delta("facet_generation_requests_total", finish_reason="length") == k
    for reason in ("stop", "eos", "cancelled", "error"):
        assert delta("facet_generation_requests_total", finish_reason=reason) == 0
    assert delta("facet_prompt_tokens_total") == 3 * k
    assert delta("facet_generation_tokens_total") == 3 * k
    assert delta("facet_adapter_requests_total", adapter="base") == k_base
    assert delta("facet_adapter_requests_total", adapter="known") == k_adapter
    assert delta("facet_adapter_requests_total", adapter="other") == 0
    assert not any("missing-" in str(key) for key in after)
    assert delta("facet_time_to_first_token_seconds_count") == k
    assert delta("facet_inter_token_latency_seconds_count") == 2 * k
    assert delta("facet_e2e_request_latency_seconds_count") == k
    assert delta("facet_request_queue_time_seconds_count") == k
    assert delta("facet_batch_size_count") >= 3  # at least one step per generated token
    assert delta("facet_step_tokens_sum") >= 3 * k + 2 * k  # prompts prefilled + decode steps
    assert delta("facet_e2e_request_latency_seconds_sum") > 0
    assert value(after, "facet_requests_running") == 0
    assert value(after, "facet_requests_waiting") == 0
    assert value(after, "facet_ready") == 1
    # The adapter was loaded once (host miss) and then found (host hits), installed on device.
    assert value(after, "facet_adapter_loads_total") == 1
    assert value(after, "facet_adapter_load_duration_seconds_count") == 1
    assert value(after, "facet_adapter_host_cache_misses_total") == 1
    assert value(after, "facet_adapter_host_cache_hits_total") >= 1
    assert value(after, "facet_adapters_resident", tier="host", family="lora") == 1
    assert value(after, "facet_adapters_resident", tier="device", family="lora") == 1
    assert value(after, "facet_adapters_resident", tier="host", family="hut") == 0
    assert value(after, "facet_adapter_evictions_total", tier="device") == 0
    assert value(after, "facet_store_bytes") == app.state.runtime.store.total_bytes() > 0
    assert value(after, "facet_adapter_device_bytes") > 0


@pytest.mark.asyncio
async def test_running_and_waiting_gauges_follow_the_engine(make_app):
    app = make_app(max_batch_size=1)
    async with serve(app) as client:
        body = {"prompt": "t1 t2", "max_new_tokens": 40}
        tasks = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(3)]
        seen_running = seen_waiting = 0.0
        while not all(t.done() for t in tasks):
            samples = await scrape(client)
            seen_running = max(seen_running, value(samples, "facet_requests_running"))
            seen_waiting = max(seen_waiting, value(samples, "facet_requests_waiting"))
            await asyncio.sleep(0.005)
        assert all(t.result().status_code == 200 for t in tasks)
        assert seen_running == 1  # max_batch_size=1: never more
        assert seen_waiting >= 1
        after = await _settled(client)
        assert value(after, "facet_requests_running") == 0
        assert value(after, "facet_requests_waiting") == 0
        assert value(after, "facet_batch_size_bucket", le="1.0") == value(after, "facet_batch_size_count")


def _random_token(rng: random.Random, n: int = 12) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(n))


async def _hostile(client, rng: random.Random, i: int) -> str:
    """One request whose adapter id, model name, path or method is random."""
    kind = i % 6
    token = _random_token(rng)
    headers = {"X-Random": token, "User-Agent": token}
    if kind == 0:
        response = await client.post("/generate", json={**GEN, "adapter": f"a-{token}"}, headers=headers)
        assert response.status_code == 404
    elif kind == 1:
        body = {"model": f"m-{token}", "prompt": "t1", "max_tokens": 1}
        assert (await client.post("/v1/completions", json=body, headers=headers)).status_code == 404
    elif kind == 2:
        body = {"model": f"Bad Model {token}!", "prompt": "t1", "max_tokens": 1}
        assert (await client.post("/v1/completions", json=body, headers=headers)).status_code == 422
    elif kind == 3:
        assert (await client.get(f"/{token}/{token}", headers=headers)).status_code == 404
    elif kind == 4:
        assert (await client.get(f"/adapters/a-{token}", headers=headers)).status_code == 404
    else:
        response = await client.request(token.upper()[:8], "/generate", headers=headers)
        assert response.status_code == 405
    return token


@pytest.mark.asyncio
async def test_random_ids_paths_and_methods_add_no_series(make_app):
    rng = random.Random(48)
    app = make_app()
    async with serve(app) as client:
        for i in range(12):  # every kind twice: creates the (bounded) series they use
            await _hostile(client, rng, i)
        await scrape(client)  # the scrape's own series appear from the next scrape on
        before = await _settled(client)
        tokens = [await _hostile(client, rng, i) for i in range(200)]
        after = await _settled(client)
    assert set(after) == set(before)
    labels = {v for _, pairs in after for _, v in pairs}
    assert "unmatched" in labels and "other" in labels
    assert not [v for v in labels for t in tokens if t in v or t.upper()[:8] in v]
    assert value(after, "facet_requests_total", route="unmatched", method="GET", status="404") >= 200 // 6
    assert value(after, "facet_requests_total", route="/generate", method="other", status="405") >= 200 // 6
    assert (
        value(after, "facet_requests_total", route="/adapters/{adapter_id}", method="GET", status="404") > 0
    )


def _per_adapter(samples) -> dict[str, float]:
    return {dict(k[1])["adapter"]: v for k, v in samples.items() if k[0] == "facet_adapter_requests_total"}


@pytest.mark.asyncio
async def test_only_the_top_adapters_get_a_label(make_app, tmp_path):
    app = make_app(metrics_top_adapters=2)
    async with serve(app) as client:
        for n, name in enumerate("abc"):
            await _upload(client, app, f"ad-{name}", tmp_path / name, seed=n)

        async def hit(name: str, times: int) -> None:
            for _ in range(times):
                body = {"prompt": "t1", "max_new_tokens": 1, "adapter": f"ad-{name}"}
                assert (await client.post("/generate", json=body)).status_code == 200

        await hit("a", 3)
        await hit("b", 2)
        await hit("c", 1)
        samples = await scrape(client)
        assert _per_adapter(samples) == {"base": 0, "ad-a": 3, "ad-b": 2, "other": 1}

        await hit("c", 3)  # c overtakes: b's traffic moves into 'other'
        samples = await scrape(client)
        assert _per_adapter(samples) == {"base": 0, "ad-c": 4, "ad-a": 3, "other": 2}


@pytest.mark.asyncio
async def test_metrics_need_an_admin_key(make_app):
    admin, infer = "admin-key-for-metrics", "infer-key-for-metrics"
    app = make_app(api_keys=[f"admin:{admin}", f"infer:{infer}"])
    async with serve(app) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": f"Bearer {infer}"})).status_code == 403
        assert (await client.post("/generate", json=GEN)).status_code == 401  # before routing
        samples = await scrape(client, headers={"Authorization": f"Bearer {admin}"})
    # Requests answered by the auth middleware still carry their route template.
    assert value(samples, "facet_requests_total", route="/metrics", method="GET", status="401") == 1
    assert value(samples, "facet_requests_total", route="/metrics", method="GET", status="403") == 1
    assert value(samples, "facet_requests_total", route="/generate", method="POST", status="401") == 1


@pytest.mark.asyncio
async def test_metrics_answer_while_the_model_loads(make_app):
    app = make_app()
    async with serve(app, ready=False) as client:
        samples = await scrape(client)  # whether or not the warm-up has finished yet
        assert ("facet_ready", ()) in samples and ("facet_requests_running", ()) in samples


@pytest.mark.asyncio
async def test_overloaded_requests_are_counted_exactly(make_app):
    app = make_app(max_batch_size=1, max_queue=1)
    async with serve(app) as client:
        before = await _settled(client)
        body = {"prompt": "t1 t2", "max_new_tokens": 30}
        responses = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(8)))
        after = await _settled(client)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": "/generate", "method": "POST"}
    assert delta("facet_requests_total", **route, status="429") == codes.count(429)
    assert delta("facet_requests_total", **route, status="200") == codes.count(200)
    assert delta("facet_generation_requests_total", finish_reason="length") == codes.count(200)
    assert delta("facet_adapter_requests_total", adapter="base") == codes.count(200)
    assert value(after, "facet_requests_running") == value(after, "facet_requests_waiting") == 0


def test_an_aborted_stream_counts_as_cancelled(make_app):
    app = make_app()
    with server_thread(app) as url:
        body = {"prompt": "t1 t2", "max_new_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/generate", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the first token arrived: hang up
        deadline = time.monotonic() + 10
        while True:
            samples = parse(httpx.get(url + "/metrics", timeout=5).text)
            if value(samples, "facet_generation_requests_total", finish_reason="cancelled") == 1:
                break
            assert time.monotonic() < deadline, "the aborted generation was not counted as cancelled"
            time.sleep(0.05)
    assert value(samples, "facet_requests_total", route="/generate", method="POST", status="200") == 1
    assert value(samples, "facet_generation_tokens_total") < 200
    assert value(samples, "facet_requests_running") == 0
