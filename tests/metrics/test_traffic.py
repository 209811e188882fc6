"""The per-adapter series: top N by traffic, the rest summed into ``other``."""

from __future__ import annotations

from server.metrics import AdapterTraffic


def test_adapter_traffic_is_bounded():
    traffic = AdapterTraffic(top_n=3)
    for i in range(1000):
        traffic.count(f"id-{i % 50}")
        traffic.count(None)
    snap = traffic.snapshot()
    assert len(snap) == 3 + 2
    assert snap["base"] == 1000 and sum(snap.values()) == 2000
    assert AdapterTraffic(top_n=0).snapshot() == {"base": 0, "other": 0}
