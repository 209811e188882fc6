"""Routing signals: what Kubernetes routers read from ``/metrics`` to pick a replica.

The Gateway API Inference Extension's endpoint picker (and llm-d's, built on it) scrapes every
model server and maps a few of its metrics onto fixed signals through an ``engineConfigs`` entry
(``deploy/inference-extension/endpoint-picker-config.yaml`` is Facet's). The signals and the
Facet family each one reads:

==========================  =================================  ===================================
signal (picker)             Facet family                       vLLM's
==========================  =================================  ===================================
queued requests             ``facet_requests_waiting``         ``vllm:num_requests_waiting``
running requests            ``facet_requests_running``         ``vllm:num_requests_running``
KV cache usage (0..1)       ``facet_kv_cache_usage_ratio``     ``vllm:kv_cache_usage_perc``
LoRA info                   ``facet_lora_requests_info``       ``vllm:lora_requests_info``
==========================  =================================  ===================================

The first two already exist (``server/metrics.py``). This module adds the others, plus
``facet_adapters_loaded_info`` (which adapter ids each tier holds: host, device, merged) and
``facet_adapters_max`` (the ``max_lora`` number as a plain gauge, for dashboards).

``facet_lora_requests_info`` follows vLLM's label format exactly, because the picker parses it
that way: one series whose labels are ``running_lora_adapters`` and ``waiting_lora_adapters``
(comma-separated adapter ids) and ``max_lora``; its value is the Unix time its labels last
changed (the picker takes the newest series). For Facet:

* ``running_lora_adapters``: adapters ready to serve without a load, i.e. those of the running
  batch and those resident on the device (slot tables or merged copies). The picker prefers a
  replica listing the requested adapter.
* ``waiting_lora_adapters``: adapters of queued requests that are not already running.
* ``max_lora``: the most distinct adapters one engine step batches (``max_batch_size``); the
  device tier itself is bounded in bytes, not in adapters, and evicts idle adapters to make room.

Adapter ids come from the store (a resident or queued adapter was found there), so they are
bounded by the residency budgets and never by what clients send. ``/metrics`` stays admin-only.

KV usage is the engine's to report: ``MetricsSources.kv_usage`` returns a fraction in [0, 1] or
None (no sample is exported then: a made-up 0 would attract traffic to a full replica).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

TIERS = ("host", "device", "merged")
# The residency's tier maps (keys (adapter_id, version)), read by name: see ``resident_ids``.
_TIER_MAPS = {"host": "_host", "device": "_device", "merged": "_merged"}


@dataclass(frozen=True)
class RoutingState:
    """Adapter ids by where they are, read in one scrape."""

    tiers: dict[str, frozenset[str]]  # tier -> adapter ids resident there
    running: frozenset[str]  # of the running batch
    waiting: frozenset[str]  # of queued requests
    max_adapters: int

    @property
    def ready(self) -> frozenset[str]:
        """Served without a load: running, or on the device (slots or merged copies)."""
        return self.running | self.tiers["device"] | self.tiers["merged"]


def _ids(keys: Iterable[Hashable | None]) -> frozenset[str]:
    """Adapter ids of residency keys ``(adapter_id, version)``; None (the base model) dropped."""
    out = set()
    for key in keys:
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            out.add(key[0])
        elif isinstance(key, str):
            out.add(key)
    return frozenset(out)


def _snapshot(read: Callable[[], list], tries: int = 5) -> list:
    """``read()`` from the scrape thread while the engine thread may resize what it reads: a
    resize raises ``RuntimeError``; try again, and give up with nothing after ``tries``."""
    for _ in range(tries):
        try:
            return read()
        except RuntimeError:
            continue
    return []


def resident_ids(residency) -> dict[str, frozenset[str]]:
    """Adapter ids per tier. Read through ``residency.resident_keys()`` where the residency has
    it, else from its tier maps (the host map under its lock, as ``resident_counts`` reads it)."""
    public = getattr(residency, "resident_keys", None)
    if public is not None:
        keys = public()
        return {tier: _ids(keys.get(tier, ())) for tier in TIERS}
    out = {}
    for tier in TIERS:
        mapping = getattr(residency, _TIER_MAPS[tier], {})
        lock = getattr(residency, "_host_lock", None) if tier == "host" else None
        with lock if lock is not None else nullcontext():
            out[tier] = _ids(_snapshot(lambda m=mapping: list(m)))
    return out


def waiting_ids(generator) -> frozenset[str]:
    """Adapter ids of the generator's queued requests (``waiting_adapter_keys`` where the
    generator has it, else a copy of its waiting queue)."""
    public = getattr(generator, "waiting_adapter_keys", None)
    if public is not None:
        return _ids(public)
    queue = getattr(generator, "_waiting", ())
    return _ids(r.adapter_key for r in _snapshot(lambda: list(queue)))


def routing_state(engine) -> RoutingState:
    """Everything the routing families show, from a live engine."""
    gen = engine.generator
    running = _ids(_snapshot(lambda: list(gen.running_adapter_keys)))
    return RoutingState(
        tiers=resident_ids(engine.residency),
        running=running,
        waiting=waiting_ids(gen) - running,
        max_adapters=gen.max_batch_size,
    )


def _csv(ids: Iterable[str]) -> str:
    return ",".join(sorted(ids))


class RoutingSignals:
    """The routing families of one app. Remembers when each info series' labels last changed:
    that time is the series' value (vLLM's convention, which the picker relies on)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._since: dict[str, tuple[tuple, float]] = {}

    def _changed_at(self, name: str, labels: tuple) -> float:
        with self._lock:
            seen = self._since.get(name)
            if seen is None or seen[0] != labels:
                seen = self._since[name] = (labels, time.time())
            return seen[1]

    def families(self, state: RoutingState | None, kv_usage: float | None) -> Iterable:
        """The gauges of one scrape; ``state`` None (no engine yet): no adapter series."""
        lora = GaugeMetricFamily(
            "facet_lora_requests_info",
            "Adapters per state in vLLM's label format (running = ready without a load: running "
            "batch or on device; waiting = queued only; max_lora = distinct adapters per step); "
            "value: Unix time the labels last changed",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        loaded = GaugeMetricFamily(
            "facet_adapters_loaded_info",
            "Adapter ids resident per tier (comma-separated, sorted); value: Unix time they last changed",
            labels=["tier", "adapters"],
        )
        most = GaugeMetricFamily("facet_adapters_max", "Distinct adapters one engine step batches (max_lora)")
        if state is not None:
            labels = (_csv(state.ready), _csv(state.waiting), str(state.max_adapters))
            lora.add_metric(list(labels), self._changed_at("lora", labels))
            for tier in TIERS:
                ids = _csv(state.tiers[tier])
                loaded.add_metric([tier, ids], self._changed_at(f"loaded:{tier}", (ids,)))
            most.add_metric([], state.max_adapters)
        yield lora
        yield loaded
        yield most

        kv = GaugeMetricFamily(
            "facet_kv_cache_usage_ratio",
            "Fraction of the engine's KV cache in use, 0..1 (absent when the engine does not report it)",
        )
        if kv_usage is not None:
            kv.add_metric([], min(1.0, max(0.0, float(kv_usage))))
        yield kv
