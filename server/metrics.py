"""Prometheus metrics: one ``CollectorRegistry`` per app (never the process-global one).

Naming follows Prometheus conventions (``facet_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms) and mirrors vLLM where a vLLM metric exists
(``vllm:time_to_first_token_seconds`` -> ``facet_time_to_first_token_seconds`` ...).

Where the numbers come from:

* HTTP requests: ``MetricsMiddleware`` (``server/metrics_http.py``; pure ASGI, outermost),
  labelled by the matched route's *path template* (``/adapters/{adapter_id}``), a fixed set of
  methods and the status code.
  Paths that match no route are ``route="unmatched"``.
* Generations: ``Metrics.sink`` wraps the request's event sink, so time to first token,
  inter-token latency, end-to-end latency, token counts and finish reasons are taken as the
  engine emits the events (also for requests whose client went away).
* Engine steps and queue time: ``Metrics.attach(engine)`` subscribes to the generator's
  ``StepStats`` (batch size, tokens, duration, queue time of newly admitted requests).
* Everything else is read at scrape time (``_StateCollector``) through ``MetricsSources``, a few
  callables the composition root (``server.runtime``) wires: readiness, the engine (running /
  waiting requests, adapters resident per tier and family, the residency counters, device
  bytes), the store's total bytes, and the fine-tune runner (jobs per state, training steps,
  latest loss). Metrics never see the ``Runtime`` itself.
* Routing signals for Kubernetes routers (``server/metrics_routing.py``): adapters per state in
  vLLM's ``lora_requests_info`` format, adapters per tier, and the KV cache usage the engine
  reports through ``MetricsSources.kv_usage``.

Label cardinality is bounded by construction: every label value comes from a server-side enum,
a route template, or an adapter id that exists in the store *and* is in the top
``metrics_top_adapters`` by traffic (the rest are counted as ``adapter="other"``; the base model
is ``adapter="base"``). Nothing a client sends becomes a label value by itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.requests import ERROR_KINDS, Event, EventSink, FinishEvent, TokenEvent
from server.methods import available_methods
from server.metrics_routing import RoutingSignals, routing_state

if TYPE_CHECKING:
    from server.engine.engine import Engine
    from server.engine.generator import StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BASE_LABEL = "base"
OTHER_LABEL = "other"
UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
TIERS = ("host", "device", "merged")
FINISH_REASONS = ("stop", "length", "eos", "cancelled", "error")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HTTP_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class AdapterTraffic:
    """Requests per adapter, exported with bounded cardinality.

    Only adapters that were found (``count`` is called after ``engine.submit`` succeeded, so an
    unknown id never gets here) are counted. At scrape time the ``top_n`` adapters by count (ties
    by id) get their own series, holding their whole count; everything else is summed into
    ``other``. ``other`` can step down when an adapter moves into the top N (Prometheus reads that
    as a counter reset); the sum over all series is always the true total.
    """

    def __init__(self, top_n: int):
        self.top_n = top_n
        self._counts: dict[str, int] = {}
        self._base = 0
        self._lock = threading.Lock()

    def count(self, adapter_id: str | None) -> None:
        with self._lock:
            if adapter_id is None:
                self._base += 1
            else:
                self._counts[adapter_id] = self._counts.get(adapter_id, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """Label value -> count: ``base``, the top N adapter ids, ``other``."""
        with self._lock:
            counts = dict(self._counts)
            base = self._base
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top_n]
        out = {BASE_LABEL: base}
        out.update(top)
        out[OTHER_LABEL] = sum(counts.values()) - sum(n for _, n in top)
        return out


@dataclass(frozen=True)
class MetricsSources:
    """What a scrape reads. Callables, because the engine, the store and the runner appear only
    during start-up (each returns None until then); any of them may raise, which leaves its
    series empty rather than failing the scrape (the engine's excepted: a bug there should show)."""

    ready: Callable[[], bool]  # /ready would answer 200
    engine: Callable[[], Engine | None]
    store_bytes: Callable[[], int | None]  # bytes of adapter weights in the store
    jobs: Callable[[], object | None]  # the fine-tune runner: ``stats()``
    # Fraction of the engine's KV cache in use (0..1), None while the engine does not report one
    # (then ``facet_kv_cache_usage_ratio`` has no sample). The hook the engine's owner wires.
    kv_usage: Callable[[], float | None] = lambda: None


_NO_SOURCES = MetricsSources(
    ready=lambda: False, engine=lambda: None, store_bytes=lambda: None, jobs=lambda: None
)


class Metrics:
    """Every metric of one app. ``registry`` is what ``GET /metrics`` exports."""

    def __init__(self, sources: MetricsSources | None = None, *, top_adapters: int):
        """``sources``: what a scrape reads; None for none (step and request metrics only)."""
        self.sources = sources if sources is not None else _NO_SOURCES
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "facet_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "facet_request_duration_seconds",
            "HTTP request duration (until the response body is sent) by route template",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "facet_time_to_first_token_seconds",
            "Time from submission (after tokenising) to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "facet_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "facet_e2e_request_latency_seconds",
            "Time from submission to the end of the generation",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "facet_request_queue_time_seconds",
            "Time a generation waited in the engine queue before its prefill",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "facet_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.generation_tokens = Counter(
            "facet_generation_tokens", "Generated tokens of finished generations", registry=r
        )
        self.finished = Counter(
            "facet_generation_requests",
            "Finished generations by finish reason",
            ["finish_reason"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.batch_size = Histogram(
            "facet_batch_size",
            "Sequences in one engine step (prefilled + decoded)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_tokens = Histogram(
            "facet_step_tokens",
            "Tokens computed in one engine step (prompt tokens prefilled + sequences decoded)",
            buckets=STEP_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "facet_step_duration_seconds", "Duration of one engine step", buckets=ITL_BUCKETS, registry=r
        )
        self.adapter_load_duration = Histogram(
            "facet_adapter_load_duration_seconds",
            "Time to load an adapter from the store into host memory",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapters = AdapterTraffic(top_adapters)
        self.routing = RoutingSignals()
        self._families: frozenset[str] = frozenset()
        self._load_cursor = 0
        self._load_lock = threading.Lock()
        r.register(_StateCollector(self))

    # ---- generations -----------------------------------------------------------------------
    def sink(self, inner: EventSink) -> TimedSink:
        """Wrap a request's sink: timings and token counts as the engine emits the events."""
        return TimedSink(inner, self)

    def submitted(self, adapter_id: str | None) -> None:
        """A generation was accepted for ``adapter_id`` (known to exist; ``None`` = base)."""
        self.adapters.count(adapter_id)

    # ---- engine ------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Observe ``engine``'s steps (batch size, tokens, duration) and admissions (queue time)."""
        if self.on_step not in engine.generator.observers:
            engine.generator.observers.append(self.on_step)

    def on_step(self, stats: StepStats) -> None:
        for waited in stats.queue_seconds:
            self.queue_time.observe(max(0.0, waited))
        if stats.batch_size <= 0:
            return
        self.batch_size.observe(stats.batch_size)
        self.step_tokens.observe(stats.prefill_tokens + stats.decode_tokens)
        self.step_duration.observe(stats.step_seconds)

    def _observe_loads(self, seconds: list[float]) -> None:
        """Feed load times the residency recorded since the last scrape into the histogram."""
        with self._load_lock:
            new = seconds[self._load_cursor :]
            self._load_cursor += len(new)
        for s in new:
            self.adapter_load_duration.observe(s)

    # ---- export ------------------------------------------------------------------------------
    def render(self) -> bytes:
        engine = self.sources.engine()
        if engine is not None:  # before the registry collects the load-time histogram
            self._observe_loads(engine.residency.stats.load_seconds)
        return generate_latest(self.registry)


class TimedSink:
    """An ``EventSink`` that times the events (engine thread) and passes them on unchanged."""

    def __init__(self, inner: EventSink, metrics: Metrics):
        self.inner = inner
        self.metrics = metrics
        self.t0 = time.monotonic()
        self._last: float | None = None

    def emit(self, event: Event) -> None:
        now = time.monotonic()
        m = self.metrics
        if isinstance(event, TokenEvent):
            if self._last is None:
                m.ttft.observe(now - self.t0)
            else:
                m.itl.observe(now - self._last)
            self._last = now
        elif isinstance(event, FinishEvent):
            m.e2e.observe(now - self.t0)
            m.prompt_tokens.inc(event.prompt_tokens)
            m.generation_tokens.inc(event.completion_tokens)
            m.finished.labels(event.finish_reason).inc()
        self.inner.emit(event)


def _retrying(read: Callable[[], object], tries: int = 5):
    """Read engine-thread state from the scrape thread: a dict resized meanwhile raises
    ``RuntimeError``; try again (None after ``tries`` failures)."""
    for _ in range(tries):
        try:
            return read()
        except RuntimeError:
            continue
    return None


def _kv_families(stats) -> Iterable:
    """The paged KV cache and its prefix cache (nothing on the padded cache)."""
    if stats is None:
        return
    for name, doc, value in (
        ("facet_kv_cache_bytes_in_use", "KV cache bytes held by sequences", stats.bytes_in_use),
        (
            "facet_kv_cache_capacity_bytes",
            "KV cache size (kv_cache_bytes rounded to blocks)",
            stats.capacity_bytes,
        ),
        ("facet_prefix_cache_blocks", "KV blocks registered in the prefix cache", stats.cached_blocks),
    ):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], value)
        yield g
    for name, doc, value in (
        (
            "facet_prefix_cache_queried_blocks",
            "Full prompt blocks looked up in the prefix cache",
            stats.queried_blocks,
        ),
        ("facet_prefix_cache_hit_blocks", "Full prompt blocks found in the prefix cache", stats.hit_blocks),
        (
            "facet_preemptions",
            "Sequences preempted (recomputed later) when KV blocks ran out",
            stats.preemptions,
        ),
    ):
        c = CounterMetricFamily(name, doc)
        c.add_metric([], value)
        yield c


class _StateCollector(Collector):
    """Gauges and counters read from the runtime at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> Iterable:
        return []  # dynamic: do not let the registry call collect() at registration

    def collect(self) -> Iterable:
        m = self.metrics
        sources = m.sources
        engine = sources.engine()
        ready = GaugeMetricFamily("facet_ready", "1 when the server serves requests (see /ready)")
        ready.add_metric([], 1.0 if sources.ready() else 0.0)
        yield ready

        running = GaugeMetricFamily("facet_requests_running", "Generations in the running batch")
        waiting = GaugeMetricFamily("facet_requests_waiting", "Generations waiting for admission")
        gen = None if engine is None else engine.generator
        running.add_metric([], 0 if gen is None else gen.num_running)
        waiting.add_metric([], 0 if gen is None else gen.num_queued)
        yield running
        yield waiting

        per_adapter = CounterMetricFamily(
            "facet_adapter_requests",
            f"Accepted generations per adapter (top {m.adapters.top_n} by traffic; "
            "'base' = no adapter, 'other' = the rest)",
            labels=["adapter"],
        )
        for label, n in m.adapters.snapshot().items():
            per_adapter.add_metric([label], n)
        yield per_adapter

        errors = CounterMetricFamily(
            "facet_request_errors",
            "Generations ended with an error, by cause (non_finite: its own scores were NaN/inf; "
            "request: one of its own steps failed; batch: a shared forward failed; no_room; aborted; "
            "invalid)",
            labels=["reason"],
        )
        counts = {} if gen is None else dict(gen.error_counts)
        for reason in ERROR_KINDS:
            errors.add_metric([reason], counts.get(reason, 0))
        yield errors

        if engine is not None:
            yield from self._residency(engine)
            yield from _kv_families(engine.kv_stats())
        yield from self._routing(engine)

        store_bytes = GaugeMetricFamily("facet_store_bytes", "Bytes of adapter weights in the store")
        try:
            total = sources.store_bytes()
        except Exception:  # a broken store must not break the scrape
            total = None
        if total is not None:
            store_bytes.add_metric([], total)
        yield store_bytes

        yield from self._fine_tunes(sources.jobs())

    def _routing(self, engine: Engine | None) -> Iterable:
        """What Kubernetes routers read (``server/metrics_routing.py``). A failing KV source leaves
        its gauge empty; the engine's state is read like every other engine series."""
        try:
            kv_usage = self.metrics.sources.kv_usage()
        except Exception:
            kv_usage = None
        state = None if engine is None else routing_state(engine)
        yield from self.metrics.routing.families(state, kv_usage)

    def _fine_tunes(self, runner) -> Iterable:
        jobs = GaugeMetricFamily("facet_fine_tune_jobs", "Fine-tune jobs per state", labels=["state"])
        steps = CounterMetricFamily(
            "facet_fine_tune_steps", "Training steps done by fine-tune jobs (all jobs, as recorded)"
        )
        loss = GaugeMetricFamily(
            "facet_fine_tune_last_loss",
            "Latest train loss of the newest running fine-tune job (else of the last finished one)",
        )
        stats = None
        if runner is not None:
            try:
                stats = runner.stats()
            except Exception:  # a broken job database must not break the scrape
                stats = None
        if stats is not None:
            for state, n in stats["jobs"].items():
                jobs.add_metric([state], n)
            steps.add_metric([], stats["steps"])
            if stats["last_loss"] is not None:
                loss.add_metric([], stats["last_loss"])
        yield jobs
        yield steps
        yield loss

    def _residency(self, engine: Engine) -> Iterable:
        m = self.metrics
        res = engine.residency
        stats = res.stats

        counts = _retrying(res.resident_counts) or {}
        # Families ever seen keep a (zero) series; replaced, not mutated: scrapes may overlap.
        m._families = families = m._families | set(available_methods()) | {f for _, f in counts}
        resident = GaugeMetricFamily(
            "facet_adapters_resident", "Adapters resident per tier and family", labels=["tier", "family"]
        )
        for tier in TIERS:
            for family in sorted(families):
                resident.add_metric([tier, family], counts.get((tier, family), 0))
        yield resident

        device_used = _retrying(lambda: res.device_used)
        device_bytes = GaugeMetricFamily(
            "facet_adapter_device_bytes", "Bytes of device memory held by adapter slot tables"
        )
        if device_used is not None:
            device_bytes.add_metric([], device_used)
        yield device_bytes

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            return family

        yield counter("facet_adapter_loads", "Adapter loads from the store into host memory", stats.loads)
        yield counter("facet_adapter_host_cache_hits", "Host adapter cache hits", stats.host_hits)
        yield counter("facet_adapter_host_cache_misses", "Host adapter cache misses", stats.host_misses)
        yield counter(
            "facet_adapter_device_installs", "Adapters installed into device slots", stats.device_installs
        )
        yield counter(
            "facet_adapter_device_hits", "Steps finding an adapter already on device", stats.device_hits
        )
        yield counter("facet_merged_cache_hits", "Merged-weight cache hits", stats.merged_hits)
        yield counter("facet_merges", "Merged-weight copies built", stats.merges)
        evictions = CounterMetricFamily(
            "facet_adapter_evictions", "Adapter evictions per tier", labels=["tier"]
        )
        for tier in TIERS:
            evictions.add_metric([tier], stats.evictions.get(tier, 0))
        yield evictions
