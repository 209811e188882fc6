"""Residency: byte budget, LRU eviction that frees memory, pinning, single-flight loads."""

from __future__ import annotations

import threading
import time

import pytest

from server.engine.loader import wrap_model
from server.engine.residency import NoDeviceRoom, Residency

from .helpers import TARGETS, random_adapter


@pytest.fixture
def setup(tiny_llama):
    model, tok = tiny_llama
    base = wrap_model("tiny", model, tok, TARGETS)
    weights = {p: m.base.weight for p, m in base.modules.items()}
    adapters = {
        i: random_adapter("lora", {"r": 4, "lora_alpha": 8}, base.module_shapes, weights, seed=i)
        for i in range(40)
    }
    calls = []

    def source(key):
        calls.append(key)
        time.sleep(0.05)
        return adapters[key]

    return base, adapters, source, calls


def test_device_budget_is_respected_and_eviction_frees(setup):
    base, adapters, source, _ = setup
    one = Residency(base.modules, source, 1 << 30, 1 << 30)
    one.device_entry(0)
    per_adapter = one.device_used
    res = Residency(base.modules, source, device_bytes=8 * per_adapter, host_bytes=1 << 30)
    for i in range(40):
        res.device_entry(i)
        assert res.device_used <= 8 * per_adapter
    assert res.stats.evictions["device"] >= 32
    assert sum(n for (tier, _), n in res.resident_counts().items() if tier == "device") <= 8
    for i in range(38):  # 2 of 8 left: the pool halves (shrinks at a quarter full)
        res.forget(i)
    res.apply_drops()
    assert res.device_used == 4 * per_adapter
    for i in range(40):
        res.forget(i)
    res.apply_drops()
    assert res.device_used == 0


def test_pinned_adapters_are_never_evicted(setup):
    """Pins are by adapter id and hold every version of it (keys are ``(id, version)``)."""
    base, adapters, source, _ = setup

    def by_id(key):
        return source(int(key[0]))

    one = Residency(base.modules, by_id, 1 << 30, 1 << 30)
    one.device_entry(("0", 1))
    res = Residency(base.modules, by_id, device_bytes=4 * one.device_used, host_bytes=1 << 30)
    res.pinned_ids.update({"0", "1"})
    res.device_entry(("0", 1))
    res.device_entry(("1", 1))
    for i in range(30):
        res.device_entry((str(i), 1))
        assert "device" in res.tier_of(("0", 1)) and "device" in res.tier_of(("1", 1))
    res.pinned_ids.add("2")
    for key in (("2", 1), ("2", 2)):  # a new version of a pinned id is pinned too
        res.device_entry(key)
    with pytest.raises(NoDeviceRoom):
        res.device_entry(("35", 1))


def test_fifty_concurrent_first_requests_load_once(setup):
    base, adapters, source, calls = setup
    res = Residency(base.modules, source, 1 << 30, 1 << 30)
    barrier = threading.Barrier(50)
    results = []

    def worker():
        barrier.wait()
        results.append(res.get_host(7))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [7]
    assert len(results) == 50 and all(r is adapters[7] for r in results)
