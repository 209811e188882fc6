"""A short soak over real HTTP (docs/checklist.md #45): memory, fds, threads and series stay flat.

``bench/soak.py`` with 500 requests over 20 adapters of every family (random non-zero weights),
mixed routes (``/generate``, its SSE stream, ``/v1/completions``), against the tiny server in a
subprocess whose device and host adapter budgets hold only a quarter and a half of them, so
adapters are evicted and reloaded all along. After 100 warm-up requests, the server's RSS must
grow less than 5 %, its open fds and threads stay flat, ``/metrics`` gains no series, every
request answers 200 (streams end with ``done``), and the gauges return to 0. The full run
(10,000 requests, 200 adapters) is ``python bench/soak.py``.
"""

from __future__ import annotations

from bench.soak import parser, soak


def test_short_soak_keeps_memory_fds_threads_and_series_flat():
    args = ["--requests", "500", "--adapters", "20", "--warmup", "100", "--concurrency", "8"]
    result = soak(parser().parse_args(args))
    assert result["statuses"] == {"200": 500}, result["errors"]
    assert result["checks"] == dict.fromkeys(result["checks"], True), result
    assert result["rss_growth_pct"] < 5.0
