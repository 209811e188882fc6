"""The FastAPI application factory.

    app = create_app(settings)                         # builds model, store and engine itself
    app = create_app(settings, engine=e, store=s)      # tests: injected (tiny model, tmp store)

Everything stateful is built by the composition root, ``server.runtime``; this module adds the
HTTP side (routers, middleware) and the lifespan. The lifespan answers at once (``/health`` 200,
``/ready`` 503) and does the slow start-up in a background task: load the base model, open the
store (``<data_dir>/adapters``), build the engine and what needs it (``open_serving``), start the
engine, run one tiny generation, start the fine-tune runner, then ``/ready`` turns 200. On
shutdown ``/ready`` turns 503 first, then the runner and the engine stop (requests still running
finish with an error).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters_store.store import AdapterStore
from server.engine import threads
from server.engine.engine import Engine
from server.engine.loader import dtype_name
from server.engine.requests import FinishEvent, SamplingParams
from server.metrics_http import MetricsMiddleware, route_templates
from server.runtime import (  # noqa: F401 - open_store, store_limits: used by tests and tools
    Runtime,
    build_runtime,
    open_serving,
    open_store,
    start_jobs,
    stop_runtime,
    store_limits,
)
from server.settings import Settings

from .api import ROUTERS
from .api.body_timeout import BodyTimeoutMiddleware
from .api.errors import install_error_handlers
from .api.middleware import AuthMiddleware, BodyLimitMiddleware, load_api_keys

log = logging.getLogger("facet.app")

WARMUP_TIMEOUT_S = 600.0
_MULTIPART_OVERHEAD = 64 << 10

DESCRIPTION = """\
One resident base model, many tiny adapters (LoRA, HUT, ETHER, DCT, SURM) chosen per request.

* `POST /generate` native generation (JSON or Server-Sent Events)
* `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`: OpenAI-compatible
* `/adapters`: upload, list, download, delete

Errors always look like `{"error": {"type", "message", "where"?}}`. With API keys configured, send
`Authorization: Bearer <key>` (scope `infer` for generation and models, `admin` for everything).
"""


def _warm_up(engine: Engine) -> None:
    """One tiny greedy generation: the first forward pass pays its one-time costs here."""
    tokenizer = engine.base.tokenizer
    ids = list(tokenizer.encode("Hello", add_special_tokens=True)) or [0]
    req = engine.submit(ids, SamplingParams(max_new_tokens=2, temperature=0.0))
    while True:
        try:
            event = req.sink.get(timeout=WARMUP_TIMEOUT_S)
        except queue.Empty:
            req.cancel()
            raise RuntimeError("warm-up generation timed out") from None
        if isinstance(event, FinishEvent):
            if event.finish_reason == "error":
                raise RuntimeError(f"warm-up generation failed: {event.error}")
            return


async def _start(rt: Runtime) -> None:
    try:
        await asyncio.to_thread(open_serving, rt)
        rt.engine.start()
        await asyncio.to_thread(_warm_up, rt.engine)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("start-up failed")
        rt.phase = "failed"
        if rt.on_failure is not None:
            rt.on_failure()
        return
    if rt.phase == "starting":
        await asyncio.to_thread(start_jobs, rt)
        rt.phase = "ready"
        if rt.freeze_gc_when_ready:
            gc.collect()
            gc.freeze()
        base = rt.engine.base
        log.info("ready: model %s, dtype %s on %s", base.name, dtype_name(base.dtype), base.device.type)


def create_app(
    settings: Settings, *, engine: Engine | None = None, store: AdapterStore | None = None
) -> FastAPI:
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    # Per-key generation quotas only with keys (without keys there is a single caller).
    runtime = build_runtime(settings, engine=engine, store=store, per_key_quotas=bool(keys))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Blocking work (loading, uploads, tokenising) runs in these threads, serially in torch:
        # only the engine thread may hold an OpenMP pool (server/engine/threads.py).
        executor = ThreadPoolExecutor(thread_name_prefix="facet-io", initializer=threads.serial)
        asyncio.get_running_loop().set_default_executor(executor)
        startup = asyncio.create_task(_start(runtime))
        try:
            yield
        finally:
            if runtime.phase != "failed":
                runtime.phase = "draining"
            startup.cancel()
            try:
                await startup
            except asyncio.CancelledError:
                pass
            await asyncio.to_thread(stop_runtime, runtime)

    # No trailing-slash redirects: Starlette builds their Location from the Host header (a
    # redirect to wherever the client says); "/generate/" is a plain 404.
    app = FastAPI(
        title="Facet", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, redirect_slashes=False
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    upload_cap = settings.max_upload_bytes + store_limits(settings).max_config_bytes + _MULTIPART_OVERHEAD
    app.add_middleware(
        BodyLimitMiddleware,
        default_cap=settings.max_body_bytes,
        caps={
            ("POST", "/adapters"): upload_cap,
            ("POST", "/files"): settings.max_file_bytes + _MULTIPART_OVERHEAD,
        },
    )
    # 408 for a JSON body that stalls (multipart uploads time out in their own parser).
    app.add_middleware(BodyTimeoutMiddleware, idle_timeout_s=settings.upload_idle_timeout_s)
    app.add_middleware(AuthMiddleware, keys=keys)  # runs before the body cap: no body read without a key
    # Outermost: counts every request, 401s and 413s included.
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics, templates=lambda: route_templates(app))
    return app


def on_startup_failure(app: FastAPI, callback: Callable[[], None]) -> None:
    """Run ``callback`` (e.g. stop the server) when the background start-up fails."""
    app.state.runtime.on_failure = callback
