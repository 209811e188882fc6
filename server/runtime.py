"""The composition root: every stateful object of one Facet process, built from one ``Settings``.

What is built where::

    build_runtime(settings, engine=, store=)   create_app, at once: the Runtime, its metrics (fed
                                               narrow callables, not the Runtime) and per-key quotas
    open_serving(rt)                           start-up's worker thread (server.app): the base model,
                                               the adapter store and the engine unless injected;
                                               then the adapter service, the training-file store
                                               and the job runner (not yet started)
    start_jobs(rt)                             once warmed up: the runner's worker thread
    stop_runtime(rt)                           shutdown: the runner (a running job pauses), then the
                                               engine

Route modules build nothing: they read these objects through ``server.api.deps``. This is the
seam where the serving side plugs in: ``open_serving`` wires whatever ``engine`` is (a local
``Engine`` today, a remote replica's proxy with the same methods tomorrow) into the adapter
service, the runner and the metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_store.backends import open_backends
from adapters_store.limits import StoreLimits
from adapters_store.objects import ObjectStore
from adapters_store.store import AdapterStore
from server.adapters_service import AdapterService
from server.engine.engine import Engine
from server.engine.loader import load_base_model
from server.jobs.files import FileStore
from server.jobs.memory import TokenBudget
from server.jobs.runner import JobRunner
from server.metrics import Metrics, MetricsSources
from server.settings import Settings

if TYPE_CHECKING:
    from server.api.quotas import KeyQuotas


@dataclass
class Runtime:
    """What the routes share at run time. One lives on ``app.state.runtime``; ``build_runtime``
    makes it and ``open_serving`` fills in the serving half during start-up."""

    settings: Settings
    engine: Engine | None = None
    store: AdapterStore | None = None
    # starting -> ready -> draining; "failed" when start-up raised.
    phase: str = "starting"
    # Fast tokenizers may not be used from several threads at once ("Already borrowed").
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    # Called when the background start-up fails (``python -m server`` stops the server).
    on_failure: Callable[[], None] | None = None
    # Prometheus metrics of this app (``server.metrics``); None when built without them.
    metrics: Metrics | None = None
    # Per-API-key generation quotas (``quotas.KeyQuotas``); None when no keys are configured.
    quotas: KeyQuotas | None = None
    # Built by ``open_serving`` once the engine and the store exist (None before).
    adapters: AdapterService | None = None
    files: FileStore | None = None
    jobs: JobRunner | None = None
    # ``python -m server``: once ready, move the start-up objects (model, tokenizer, ~400k of
    # them) out of the garbage collector's reach with ``gc.freeze()``, so its full collections
    # stop scanning them; they made first loads of an adapter ~10 ms slower. Off in tests, which
    # build many apps in one process.
    freeze_gc_when_ready: bool = False

    @property
    def uploads_dir(self) -> Path:
        return self.settings.data_dir / "uploads"

    def engine_alive(self) -> bool:
        thread = getattr(self.engine, "_thread", None)
        return thread is not None and thread.is_alive()

    def not_ready_reason(self) -> str | None:
        """``None`` when requests can be served; otherwise why not (safe to show)."""
        if self.phase == "starting":
            return "the model is loading"
        if self.phase == "failed":
            return "start-up failed; see the server log"
        if self.phase == "draining":
            return "the server is shutting down"
        if not self.engine_alive():
            return "the engine is not running"
        stalled = self.engine.generator.stalled_for()
        if stalled > self.settings.engine_stall_s:
            return f"the engine has made no progress for {stalled:.0f} s"
        return None

    def is_ready(self) -> bool:
        return self.phase == "ready" and self.not_ready_reason() is None

    def check_ready(self) -> None:
        # Imported here: server.api's package imports every router, and they import this module.
        from server.api.errors import ApiError

        reason = self.not_ready_reason()
        if reason is not None:
            raise ApiError(503, reason, headers={"Retry-After": str(self.settings.retry_after_s)})

    def admit(self) -> None:
        """Reserve a place in the engine's queue, or 429 when it is full. The place is used by
        ``engine.submit(..., reserved=True)`` (or given back if that fails): requests still loading
        their adapter count against ``max_queue`` from here on, exactly once."""
        from server.api.errors import ApiError

        waiting = self.engine.generator.reserve(self.settings.max_queue)
        if waiting is not None:
            raise ApiError(
                429,
                f"server overloaded: {waiting} requests already waiting; retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )


# ---- build (create_app) ----------------------------------------------------------------------
def build_runtime(
    settings: Settings,
    *,
    engine: Engine | None = None,
    store: AdapterStore | None = None,
    per_key_quotas: bool = False,
) -> Runtime:
    """The Runtime of one app, with what can exist before the model loads: metrics and (with API
    keys configured) per-key quotas. ``engine``/``store``: injected (tests), else built by
    ``open_serving``."""
    rt = Runtime(settings, engine=engine, store=store)
    rt.metrics = Metrics(_metrics_sources(rt), top_adapters=settings.metrics_top_adapters)
    if per_key_quotas:
        from server.api.quotas import KeyQuotas  # see check_ready

        rt.quotas = KeyQuotas.from_settings(settings)
    return rt


def _metrics_sources(rt: Runtime) -> MetricsSources:
    """What a scrape reads, as callables: the engine, store and runner appear during start-up."""

    def store_bytes() -> int | None:
        return None if rt.store is None else rt.store.total_bytes()

    def kv_usage() -> float | None:
        stats = None if rt.engine is None else rt.engine.kv_stats()
        return None if stats is None else stats.usage

    return MetricsSources(
        ready=rt.is_ready,
        engine=lambda: rt.engine,
        store_bytes=store_bytes,
        jobs=lambda: rt.jobs,
        kv_usage=kv_usage,
    )


def store_limits(settings: Settings) -> StoreLimits:
    return StoreLimits(max_weights_bytes=settings.max_upload_bytes)


def open_store(settings: Settings, base) -> AdapterStore:
    """The adapter store for ``base``: validated against its shapes, tables checked in its dtype.
    Its blob store and index are the ones ``settings.store_*`` name (local files + SQLite by
    default; boto3/psycopg are imported only when S3/PostgreSQL are chosen)."""
    root = settings.data_dir / "adapters"
    blobs, index = open_backends(
        root,
        settings.store_blob_url,
        settings.store_index_url,
        s3_endpoint=settings.store_s3_endpoint,
        s3_region=settings.store_s3_region,
    )
    return AdapterStore(
        root,
        base.module_shapes,
        base.name,
        store_limits(settings),
        table_dtype=base.dtype,
        blobs=blobs,
        index=index,
        cache_bytes=settings.store_cache_bytes,
        orphan_grace_s=settings.store_orphan_grace_s,
    )


# ---- start-up (a worker thread of the lifespan) ----------------------------------------------
def open_serving(rt: Runtime) -> None:
    """Blocking part of start-up: the engine and store unless injected, then everything that
    needs them. Raises on failure (the lifespan marks the runtime failed)."""
    _open_engine_and_store(rt)
    _clear_uploads(rt)
    if rt.metrics is not None:
        rt.metrics.attach(rt.engine)
    rt.adapters = AdapterService(rt.store, rt.engine)
    rt.files = _make_file_store(rt)
    # Built now, not on first use: opening it marks jobs a previous process left running as
    # failed or queues them to resume, so none stays "running" after a restart.
    rt.jobs = _make_runner(rt)


def _open_engine_and_store(rt: Runtime) -> None:
    settings = rt.settings
    if rt.engine is None:
        base = load_base_model(settings)
        if rt.store is None:
            rt.store = open_store(settings, base)
        store = rt.store
        rt.engine = Engine(
            base, settings, source=lambda key: store.load(*key), current_version=store.current_version
        )
    elif rt.store is None:
        rt.store = open_store(settings, rt.engine.base)


def _clear_uploads(rt: Runtime) -> None:
    rt.uploads_dir.mkdir(parents=True, exist_ok=True)
    for leftover in rt.uploads_dir.glob("upload-*"):  # from a crash mid-upload
        leftover.unlink(missing_ok=True)


def _objects(rt: Runtime) -> ObjectStore:
    """Training files and job data go to the adapter store's blob store (and its cache)."""
    return ObjectStore(rt.store.blobs, rt.store.cache)


def _make_file_store(rt: Runtime) -> FileStore:
    """Uploaded training files: objects in the adapter store's blob store, rows next to its index
    (SQLite under ``<data_dir>/files`` or the same PostgreSQL)."""
    return FileStore(
        rt.settings.data_dir / "files",
        objects=_objects(rt),
        index_url=rt.settings.store_index_url,
        orphan_grace_s=rt.store.orphan_grace_s,
    )


def _make_runner(rt: Runtime) -> JobRunner:
    """Fine-tunes train on the resident base model, yield to serving while requests wait, and
    store what they train through the adapter service. Their table is in the store's index
    (SQLite ``<data_dir>/jobs/jobs.sqlite3`` or the same PostgreSQL), their data and resume
    states in its blob store: with a shared store any replica claims and resumes any job."""
    engine = rt.engine
    generator = engine.generator

    def busy() -> bool:
        return generator.num_waiting > 0 or generator.num_running > 0

    return JobRunner(
        engine.base,
        rt.store,
        rt.settings.data_dir / "jobs",
        busy=busy,
        adapters=rt.adapters,
        token_budget=TokenBudget.for_model(rt.settings, engine.base),
        index_url=rt.settings.store_index_url,
        objects=_objects(rt),
        runner_id=rt.settings.jobs_runner_id,
        lease_s=rt.settings.jobs_lease_s,
    )


def start_jobs(rt: Runtime) -> None:
    """Once the engine serves: the runner's worker thread starts training queued jobs."""
    if rt.jobs is not None:
        rt.jobs.start()


# ---- shutdown --------------------------------------------------------------------------------
def stop_runtime(rt: Runtime) -> None:
    """The runner first (a running job saves its state and is queued again), then the engine
    (requests still running finish with an error)."""
    if rt.jobs is not None:
        rt.jobs.close()
    if rt.files is not None:
        rt.files.close()
    if rt.engine is not None:
        rt.engine.stop()
