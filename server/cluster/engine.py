"""The engine deployment: each replica is one whole Facet app (base model + engine + store client).

A replica builds its app with the configured factory (``create_app(settings)`` by default; tests
pass a tiny-model builder), runs its lifespan in-process (``asgi_local.LocalASGI``) and answers
``handle_http`` calls from the ingress by running the request against that app and streaming the
response back: first ``{"status", "headers"}``, then the body chunks as the app sends them.

Adapter affinity is Ray Serve's model multiplexing. The ingress sends every adapter request with
``multiplexed_model_id = "<adapter_id>@<version>"``; the replica passes that id through its
``serve.multiplexed`` loader, which Ray keeps as an LRU of ``max_adapters_per_replica`` ids per
replica and reports to the router, so later requests for the id go to the replica holding it.
The loader only *records* the id: the request that follows loads the adapter through the
engine's own path (``Engine._hold``: host LRU, device slots), and an id the Ray LRU drops is left
to the engine's byte-bounded residency to evict. The version in the id is routing only: the app
resolves the current version from the shared store index on every request
(``Engine(current_version=store.current_version)``), so a replica that never saw an upload still
serves the newest version, and a bumped version is a new id (new routing, no stale affinity).

Every response carries ``X-Facet-Replica: <replica id>``, streams too (it is in the first item).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from ray import serve

from server.api.middleware import load_api_keys
from server.settings import Settings

from .asgi_local import HttpRequest, LocalASGI
from .config import JOBS_MODEL_ID, import_factory
from .metrics_board import METRICS_PUSH_S, board

log = logging.getLogger("facet.cluster")

REPLICA_HEADER = "x-facet-replica"
READY_TIMEOUT_S = 900.0


class ResidentAdapter:
    """What the multiplexed loader returns for one ``id@version``; Ray calls ``__del__`` when its
    LRU drops it (and Python may call it again at collection: it acts once)."""

    def __init__(self, owner: FacetEngine, model_id: str):
        self.owner = owner
        self.model_id = model_id
        self.loaded_at = time.time()
        self._dropped = False

    def __del__(self):
        # Ray runs a sync __del__ in an executor thread: hand the bookkeeping to the loop.
        if not self._dropped:
            self._dropped = True
            try:
                self.owner.loop.call_soon_threadsafe(self.owner._on_evicted, self.model_id)
            except RuntimeError:  # the loop is closed: the replica is going away anyway
                pass


@serve.deployment
class FacetEngine:
    async def __init__(self, settings: dict, factory: str, max_adapters: int):
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.loop = asyncio.get_running_loop()
        self.settings = local_settings(Settings(**settings), serve.get_replica_context())
        self._internal_headers = _internal_auth(self.settings)
        self.local = LocalASGI(import_factory(factory)(self.settings))
        await self.local.startup()
        await self._wait_ready()
        self.resident: OrderedDict[str, float] = OrderedDict()  # mirror of Ray's LRU, oldest first
        self.evicted: list[str] = []
        self.holds_jobs = False

        async def load(model_id: str) -> ResidentAdapter:
            return self._on_loaded(model_id)

        # Wired per instance so the LRU size is a setting (Ray detects it on the instance).
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        self._metrics_task = asyncio.create_task(self._push_metrics_forever())
        log.info("replica %s ready", self.replica_id)

    async def _wait_ready(self) -> None:
        """Until the app's background start-up (model, store, engine, warm-up) answers /ready."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status, body = await self._call("GET", "/ready")
            if status == 200:
                return
            if b"fail" in body or time.monotonic() > deadline:
                raise RuntimeError(f"replica start-up failed: /ready {status} {body[:300]!r}")
            await asyncio.sleep(0.05)

    async def _call(self, method: str, path: str) -> tuple[int, bytes]:
        """One internal request to the local app (whole body)."""
        status, chunks = 500, []
        async for item in self.local.stream(HttpRequest(method, path, headers=self._internal_headers)):
            if isinstance(item, tuple):
                status = item[1]
            else:
                chunks.append(item)
        return status, b"".join(chunks)

    # ---- multiplexing ------------------------------------------------------------------------
    def _on_loaded(self, model_id: str) -> ResidentAdapter:
        self.resident[model_id] = time.time()
        if model_id == JOBS_MODEL_ID:
            self.holds_jobs = True
        return ResidentAdapter(self, model_id)

    def _on_evicted(self, model_id: str) -> None:
        self.resident.pop(model_id, None)
        self.evicted.append(model_id)
        if model_id == JOBS_MODEL_ID:
            self.holds_jobs = False
        log.info("replica %s: multiplex LRU dropped %s", self.replica_id, model_id)

    async def _touch(self, model_id: str) -> None:
        """Mark ``model_id`` most recently used on this replica (loading it if it is new).

        The jobs id is touched first on the replica that holds it, so adapter traffic never
        evicts it: fine-tunes stay on one replica while it lives."""
        if self.holds_jobs and model_id != JOBS_MODEL_ID:
            await self._multiplexed(JOBS_MODEL_ID)
            self.resident.move_to_end(JOBS_MODEL_ID)
        await self._multiplexed(model_id)
        if model_id in self.resident:
            self.resident.move_to_end(model_id)

    # ---- requests ----------------------------------------------------------------------------
    async def handle_http(self, request: dict) -> AsyncIterator[dict | bytes]:
        """Run one HTTP request against the local app: ``{"status", "headers"}``, then chunks.

        When the caller cancels (its client went away), the local request sees http.disconnect
        and its generation is cancelled (``LocalASGI.stream``'s clean-up)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._touch(model_id)
        stream = self.local.stream(HttpRequest(**request))
        try:
            async for item in stream:
                if isinstance(item, tuple):
                    _, status, headers = item
                    headers = [(k, v) for k, v in headers if k.lower() != REPLICA_HEADER]
                    headers.append((REPLICA_HEADER, self.replica_id))
                    yield {"status": status, "headers": headers}
                else:
                    yield item
        finally:
            await stream.aclose()

    def describe(self) -> dict:
        """This replica's id and multiplexing state (tests, debugging)."""
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "resident": list(self.resident),
            "evicted": list(self.evicted),
            "holds_jobs": self.holds_jobs,
        }

    # ---- metrics -----------------------------------------------------------------------------
    async def _push_metrics_forever(self) -> None:
        """Every METRICS_PUSH_S, this replica's /metrics text goes to the board the ingress
        reads (a handle reaches one replica, not all: the replicas report instead)."""
        target = board()
        while True:
            try:
                status, text = await self._call("GET", "/metrics")
                if status == 200:
                    await target.put.remote(self.replica_id, text.decode("utf-8", "replace"))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("replica %s: metrics push failed", self.replica_id, exc_info=True)
            await asyncio.sleep(METRICS_PUSH_S)

    def check_health(self) -> None:
        if self._metrics_task.done() and not self._metrics_task.cancelled():
            self._metrics_task.result()  # raises what stopped it

    async def __del__(self):
        self._metrics_task.cancel()
        try:
            await board().forget.remote(self.replica_id)
        except Exception:
            pass
        await self.local.shutdown()


def local_settings(settings: Settings, context) -> Settings:
    """A replica's own settings. With S3 + PostgreSQL nothing of the store is under ``data_dir``
    but the read-through cache, which the store empties at open and bounds per process: each
    replica gets ``<data_dir>/replica-<rank on its node>`` (the rank is reused by a replacement,
    so its jobs and uploads folders survive a restart). The base model cache stays shared."""
    if not (settings.store_blob_url.startswith("s3://") and settings.store_index_url != "sqlite"):
        return settings  # embedded store: the replicas share <data_dir>/adapters itself
    rank = getattr(getattr(context, "rank", None), "local_rank", None)
    slot = f"replica-{rank}" if rank is not None else f"replica-{context.replica_id.unique_id}"
    return settings.model_copy(
        update={"data_dir": settings.data_dir / slot, "models_dir": settings.model_cache_dir}
    )


def _internal_auth(settings: Settings) -> list[tuple[str, str]]:
    """Headers for the replica's own calls to its app (/ready is open; /metrics may need a key)."""
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    admin = [token for token, scope in keys.items() if scope == "admin"]
    return [("authorization", f"Bearer {admin[0]}")] if admin else []
