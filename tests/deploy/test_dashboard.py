"""Every metric the Grafana dashboard queries is one that ``/metrics`` of a tiny app really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.app import create_app
from tests.api.conftest import serve
from tests.api.tiny_server import build_tiny, tiny_settings
from tests.metrics.conftest import scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "facet.json"
METRIC = re.compile(r"\b(facet_[a-zA-Z0-9_]+)\b")
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le"}


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.mark.asyncio
async def test_dashboard_queries_only_exported_metrics(tmp_path):
    settings = tiny_settings(data_dir=tmp_path / "data")
    engine, store = build_tiny(settings)
    app = create_app(settings, engine=engine, store=store)
    async with serve(app) as client:
        response = await client.post("/generate", json={"prompt": "t1 t2", "max_new_tokens": 2})
        assert response.status_code == 200
        exported = {name for name, _ in await scrape(client)}

    expressions = _expressions()
    assert len(expressions) >= 15
    used = set()
    for expr in expressions:
        names = METRIC.findall(expr)
        assert names, expr
        used.update(names)
        missing = [n for n in names if n not in exported]
        assert not missing, (expr, missing)
        # Nothing else than metric names, label names and PromQL functions/keywords.
        words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", expr))
        assert words <= PROMQL_WORDS, (expr, words - PROMQL_WORDS)
    # The dashboard covers throughput, latency, queue, batching, residency and cache behaviour.
    for name in (
        "facet_generation_tokens_total",
        "facet_time_to_first_token_seconds_bucket",
        "facet_inter_token_latency_seconds_bucket",
        "facet_e2e_request_latency_seconds_bucket",
        "facet_requests_waiting",
        "facet_batch_size_bucket",
        "facet_adapters_resident",
        "facet_adapter_host_cache_hits_total",
        "facet_merged_cache_hits_total",
    ):
        assert name in used, name
