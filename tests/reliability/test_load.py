"""Overload over real HTTP (RELIABILITY.md 2.2, 4.F 41), short: the tiny server in a subprocess.

``bench/load.py``'s driver against the tiny server with ``max_batch_size`` 4 and ``max_queue`` 4:
capacity is measured closed-loop, then requests arrive open-loop at twice that rate for 4 s.
The excess must be refused at once (429 with ``Retry-After``, p50 < 50 ms), everything admitted
must complete (200), nothing else may happen (no 5xx, no dropped connection), admitted latency
stays bounded (the queue is), the server's RSS does not grow, and afterwards the running and
waiting gauges of ``/metrics`` are back to 0.
"""

from __future__ import annotations

import pytest

from bench.load import launch, run_load

BODY = {"prompt": "t1 t2 t3 t4 t5 t6 t7 t8", "max_new_tokens": 32}


@pytest.fixture(scope="module")
def server():
    with launch(True, None, ["--max-batch-size", "4", "--max-queue", "4"]) as s:
        yield s


def test_twice_capacity_refuses_the_excess_fast_and_completes_the_rest(server):
    r = run_load(server, BODY, concurrency=6, capacity_s=2.0, factor=2.0, duration=4.0)
    cap, o = r["capacity_phase"], r["overload"]
    # (closed loop: a batch finishing at once re-sends 4 requests before the queue moves: a few 429s)
    assert cap["server_errors_5xx"] == cap["other"] == 0 and r["capacity_rps"] > 2, r
    assert r["sent_rps"] >= 0.9 * r["offered_rps"], r  # the client really offered 2x
    assert o["refused_429"] >= 0.2 * o["sent"], r  # real excess, refused
    assert o["completed"] + o["refused_429"] == o["sent"], r  # admitted = completed; no 5xx, no drops
    assert o["completed"] >= 0.5 * r["capacity_rps"] * 4.0, r  # still serving near capacity
    assert o["refused_without_retry_after"] == 0
    assert o["refused_p50_ms"] < 50 and o["refused_p99_ms"] < 250, r
    assert o["ok_p99_ms"] < 5000, r  # a bounded queue bounds the wait
    assert r["server_after"]["rss_mb"] - r["server_before"]["rss_mb"] < 30, r
    assert r["gauges_after"] == {"facet_requests_running": 0, "facet_requests_waiting": 0}
