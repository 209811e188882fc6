"""Overload over real HTTP (docs/checklist.md #41), short: the tiny server in a subprocess.

``bench/load.py``'s driver against the tiny server with ``max_batch_size`` 4 and ``max_queue`` 4:
capacity is measured closed-loop, then requests arrive open-loop at twice that rate for 4 s.
The excess must be refused at once (429 with ``Retry-After``), everything admitted must complete
(200), nothing else may happen (no 5xx, no dropped connection), admitted latency stays bounded (the
queue is), the server's RSS does not grow, and afterwards the running and waiting gauges of
``/metrics`` are back to 0.

Every speed-related check is relative to what the same server did in the same run (a refusal
against an admitted request, overload latency against the closed-loop latency), so the verdict
does not depend on how fast the machine is; the absolute figures are ``bench/load.py``'s.
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
    assert cap["server_errors_5xx"] == cap["other"] == 0 and r["capacity_rps"] > 0, r
    assert o["refused_429"] > 0, r  # twice the capacity was offered: some of it is refused
    assert o["completed"] + o["refused_429"] == o["sent"], r  # admitted = completed; no 5xx, no drops
    assert o["completed"] > 0 and o["refused_without_retry_after"] == 0, r
    # a refusal never waits in the queue: it is answered well before an admitted request finishes
    assert 4 * o["refused_p50_ms"] < o["ok_p50_ms"], r
    # the queue is bounded (max_queue = max_batch_size = 4): an admitted request waits for at most
    # about two batches ahead of it, so its latency stays within a few closed-loop latencies
    assert o["ok_p99_ms"] < 4 * cap["ok_p99_ms"], r
    assert r["server_after"]["rss_mb"] - r["server_before"]["rss_mb"] < 30, r
    assert r["gauges_after"] == {"facet_requests_running": 0, "facet_requests_waiting": 0}
