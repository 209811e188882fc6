"""``Metrics`` reads only its ``MetricsSources`` (no ``Runtime``): readiness, engine, store bytes, jobs."""

from __future__ import annotations

from server.metrics import Metrics, MetricsSources

from .conftest import parse, value


class Jobs:
    def stats(self) -> dict:
        return {"jobs": {"queued": 2, "running": 1}, "steps": 7, "last_loss": 0.25}


def _broken() -> int:
    raise OSError("the index is unreachable")


def test_the_scrape_reads_exactly_the_sources_it_is_given():
    sources = MetricsSources(
        ready=lambda: True, engine=lambda: None, store_bytes=lambda: 1234, jobs=lambda: Jobs()
    )
    samples = parse(Metrics(sources, top_adapters=3).render().decode())
    assert value(samples, "facet_ready") == 1.0
    assert value(samples, "facet_store_bytes") == 1234.0
    assert value(samples, "facet_fine_tune_jobs", state="queued") == 2.0
    assert value(samples, "facet_fine_tune_steps_total") == 7.0
    assert value(samples, "facet_fine_tune_last_loss") == 0.25
    assert value(samples, "facet_requests_running") == 0.0  # no engine yet


def test_a_failing_source_leaves_its_series_empty_not_the_scrape():
    sources = MetricsSources(ready=lambda: False, engine=lambda: None, store_bytes=_broken, jobs=lambda: None)
    samples = parse(Metrics(sources, top_adapters=3).render().decode())
    assert value(samples, "facet_ready") == 0.0
    assert not any(name == "facet_store_bytes" for name, _ in samples)
    assert not any(name == "facet_fine_tune_jobs" for name, _ in samples)
