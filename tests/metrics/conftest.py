"""Fixtures for the metrics tests: tiny-model apps and a parsed ``/metrics`` scrape."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from tests.api.tiny_server import build_tiny, tiny_settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def make_app(tmp_path) -> Callable:
    """``make_app(**settings)`` -> a tiny-model app with a fresh store under ``tmp_path``."""

    def make(**overrides):
        settings = tiny_settings(data_dir=tmp_path / "data", **overrides)
        engine, store = build_tiny(settings)
        return create_app(settings, engine=engine, store=store)

    return make


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: {(name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient, **kw) -> Samples:
    response = await client.get("/metrics", **kw)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)
