"""Routing signals on ``/metrics`` (what the inference extension's endpoint picker reads) and
``/v1/models`` naming each adapter's parent, on a tiny-model app.

The picker's mapping (``deploy/inference-extension/endpoint-picker-config.yaml``) must name only
families a scrape has; ``tests/deploy/test_k8s.py`` checks the file, this checks the families.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import yaml

from server.engine.requests import TokenEvent
from server.metrics import Metrics, MetricsSources
from tests.metrics.conftest import parse, scrape, value

from .conftest import adapter_files, serve, upload
from .tiny_server import BASE_NAME

PICKER_CONFIG = Path(__file__).resolve().parents[2] / "deploy/inference-extension/endpoint-picker-config.yaml"

LORA_INFO = "facet_lora_requests_info"


def _lora_info(samples) -> dict[str, str]:
    """The labels of the one ``facet_lora_requests_info`` series."""
    series = [dict(labels) for (name, labels) in samples if name == LORA_INFO]
    assert len(series) == 1, series
    return series[0]


def _loaded(samples, tier: str) -> str:
    series = [dict(labels) for (name, labels) in samples if name == "facet_adapters_loaded_info"]
    (match,) = [s for s in series if s["tier"] == tier]
    return match["adapters"]


class HoldFirstToken:
    """A sink that blocks the engine thread on its first token until ``release`` is set: the
    request stays admitted while others queue behind it (``max_batch_size=1``)."""

    def __init__(self, inner, held: threading.Event, release: threading.Event):
        self.inner, self.held, self.release = inner, held, release
        self.seen = False

    def emit(self, event) -> None:
        if isinstance(event, TokenEvent) and not self.seen:
            self.seen = True
            self.held.set()
            assert self.release.wait(30)
        self.inner.emit(event)


@pytest.mark.asyncio
async def test_routing_families_follow_loads_and_the_queue(make_app, tmp_path):
    app = make_app(max_batch_size=1)
    async with serve(app) as client:
        before = await scrape(client)
        assert _lora_info(before) == {
            "running_lora_adapters": "",
            "waiting_lora_adapters": "",
            "max_lora": "1",
        }
        assert value(before, "facet_adapters_max") == 1.0
        assert _loaded(before, "host") == _loaded(before, "device") == ""
        # The paged KV cache reports its usage: nothing runs, so no block is held.
        assert value(before, "facet_kv_cache_usage_ratio") == 0.0

        for name, seed in (("alpha", 1), ("beta", 2)):
            config, weights = adapter_files(app, "lora", tmp_path / name, seed=seed)
            assert (await upload(client, name, config, weights)).status_code == 201

        metrics = app.state.runtime.metrics
        held, release = threading.Event(), threading.Event()
        wrap = metrics.sink
        first = [True]

        def sink(inner):  # only the first generation holds the engine
            outer = wrap(inner)
            if first[0]:
                first[0] = False
                return HoldFirstToken(outer, held, release)
            return outer

        metrics.sink = sink
        body = {"prompt": "t1 t2", "max_new_tokens": 3}
        try:
            a = asyncio.create_task(client.post("/generate", json={**body, "adapter": "alpha"}))
            assert await asyncio.to_thread(held.wait, 30)  # alpha prefilled, the engine held
            b = asyncio.create_task(client.post("/generate", json={**body, "adapter": "beta"}))
            engine = app.state.runtime.engine
            for _ in range(3000):  # beta loaded to host and queued (30 s at most)
                if engine.generator.num_waiting == 1:
                    break
                await asyncio.sleep(0.01)
            during = await scrape(client)
        finally:
            release.set()
        assert (await a).status_code == 200 and (await b).status_code == 200
        after = await scrape(client)

    assert value(during, "facet_requests_waiting") == 1.0
    info = _lora_info(during)
    assert info["running_lora_adapters"] == "alpha"  # on the device for its prefill
    assert info["waiting_lora_adapters"] == "beta"
    assert _loaded(during, "host") == "alpha,beta" and _loaded(during, "device") == "alpha"
    assert value(during, LORA_INFO, **info) >= value(before, LORA_INFO, **_lora_info(before))

    assert _lora_info(after)["waiting_lora_adapters"] == ""
    assert set(_lora_info(after)["running_lora_adapters"].split(",")) == {"alpha", "beta"}
    assert value(after, "facet_requests_waiting") == 0.0


def test_kv_usage_comes_from_its_source_clamped_to_a_fraction():
    def sources(kv):
        return MetricsSources(
            ready=lambda: True, engine=lambda: None, store_bytes=lambda: None, jobs=lambda: None, kv_usage=kv
        )

    def broken():
        raise RuntimeError("engine gone")

    def kv_of(kv):
        return parse(Metrics(sources(kv), top_adapters=1).render().decode())

    assert value(kv_of(lambda: 0.25), "facet_kv_cache_usage_ratio") == 0.25
    assert value(kv_of(lambda: 1.5), "facet_kv_cache_usage_ratio") == 1.0
    for kv in (lambda: None, broken):
        samples = kv_of(kv)
        assert not any(name == "facet_kv_cache_usage_ratio" for name, _ in samples)
        assert value(samples, "facet_ready") == 1.0  # the rest of the scrape is there


@pytest.mark.asyncio
async def test_picker_config_names_families_a_scrape_has(client, tmp_path):
    config, weights = adapter_files(client.app, "lora", tmp_path / "p")
    assert (await upload(client, "p", config, weights)).status_code == 201
    text = (await client.get("/metrics")).text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    picker = yaml.safe_load(PICKER_CONFIG.read_text())
    (extractor,) = [p for p in picker["plugins"] if p["type"] == "model-server-protocol-metrics"]
    (facet,) = [e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "facet"]
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        name = facet[field].split("{")[0]
        assert name in families, (field, name)


@pytest.mark.asyncio
async def test_v1_models_names_the_base_as_each_adapters_parent(client, tmp_path):
    for name in ("m-one", "m-two"):
        config, weights = adapter_files(client.app, "lora", tmp_path / name)
        assert (await upload(client, name, config, weights)).status_code == 201
    cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert set(cards) == {BASE_NAME, "m-one", "m-two"}
    assert cards[BASE_NAME]["parent"] is None and cards[BASE_NAME]["root"] is None
    for name in ("m-one", "m-two"):
        assert cards[name]["parent"] == BASE_NAME and cards[name]["root"] == BASE_NAME
        one = (await client.get(f"/v1/models/{name}")).json()
        assert one["parent"] == BASE_NAME


def test_routing_state_prefers_the_engines_public_readers():
    """Where the engine offers ``Residency.resident_keys()`` and ``Generator.waiting_adapter_keys``,
    those are read (keys ``(id, version)``, the base model's None dropped), not its internals."""
    from types import SimpleNamespace

    from server.metrics_routing import routing_state

    residency = SimpleNamespace(
        resident_keys=lambda: {"host": [("a", 1), ("b", 3)], "device": [("a", 1)], "merged": []}
    )
    generator = SimpleNamespace(
        running_adapter_keys=[("c", 2), None],
        waiting_adapter_keys=[("b", 3), ("c", 2), None],
        max_batch_size=4,
    )
    state = routing_state(SimpleNamespace(residency=residency, generator=generator))
    assert state.tiers == {"host": {"a", "b"}, "device": {"a"}, "merged": frozenset()}
    assert state.running == {"c"} and state.waiting == {"b"}  # c runs: not also waiting
    assert state.ready == {"a", "c"} and state.max_adapters == 4
