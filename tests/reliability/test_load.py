"""Overload over real HTTP (docs/checklist.md #41), short: the tiny server in a subprocess.

``bench/load.py``'s driver against the tiny server with ``max_batch_size`` 4 and ``max_queue`` 4:
capacity is measured closed-loop, then requests arrive open-loop at twice that rate for 4 s.
The excess must be refused (429 with ``Retry-After``), everything admitted must complete (200),
nothing else may happen (no 5xx, no dropped connection), the queue stays bounded while overloaded
(the running and waiting gauges, scraped every 50 ms, never exceed the batch and queue sizes), the
server's RSS does not grow, and afterwards the gauges are back to 0.

Nothing here is a latency: on a 2-core machine the load client shares the cores with the server
(and, under ``taskset -c 0``, one core), so the client's own clock says more about its scheduling
than about the server. The bounded queue is what bounds an admitted request's wait, and it is
checked directly; the latencies are ``bench/load.py``'s figures.
"""

from __future__ import annotations

import pytest

from bench.load import launch, run_load

BODY = {"prompt": "t1 t2 t3 t4 t5 t6 t7 t8", "max_new_tokens": 32}


@pytest.fixture(scope="module")
def server():
    with launch(True, None, ["--max-batch-size", "4", "--max-queue", "4"]) as s:
        yield s


def test_twice_capacity_refuses_the_excess_and_completes_the_rest(server):
    r = run_load(server, BODY, concurrency=6, capacity_s=2.0, factor=2.0, duration=4.0)
    cap, o, peaks = r["capacity_phase"], r["overload"], r["overload_gauge_peaks"]
    # (closed loop: a batch finishing at once re-sends 4 requests before the queue moves: a few 429s)
    assert cap["server_errors_5xx"] == cap["other"] == cap["transport_errors"] == 0, cap
    assert r["capacity_rps"] > 0, r
    assert set(o["statuses"]) <= {"200", "429"}, o["statuses"]  # no 5xx, no other 4xx, no drops
    assert o["refused_429"] > 0 and o["completed"] > 0, o  # 2x capacity offered: some refused
    assert o["refused_without_retry_after"] == 0, o
    assert peaks["scrapes"] > 0 and peaks["facet_requests_running"] <= 4, peaks  # max_batch_size
    assert peaks["facet_requests_waiting"] <= 4, peaks  # max_queue: an admitted request's wait is bounded
    assert r["server_after"]["rss_mb"] - r["server_before"]["rss_mb"] < 30, r
    assert r["gauges_after"] == {"facet_requests_running": 0, "facet_requests_waiting": 0}
