"""What the routes share at run time: engine, store, readiness and admission control.

One ``Runtime`` lives on ``app.state.runtime``; the lifespan fills it in (``server.app``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from server.settings import Settings

from .errors import ApiError

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore
    from server.engine.engine import Engine
    from server.metrics import Metrics

    from .quotas import KeyQuotas


@dataclass
class Runtime:
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

    def check_ready(self) -> None:
        reason = self.not_ready_reason()
        if reason is not None:
            raise ApiError(503, reason, headers={"Retry-After": str(self.settings.retry_after_s)})

    def admit(self) -> None:
        """Reserve a place in the engine's queue, or 429 when it is full. The place is used by
        ``engine.submit(..., reserved=True)`` (or given back if that fails): requests still loading
        their adapter count against ``max_queue`` from here on, exactly once."""
        waiting = self.engine.generator.reserve(self.settings.max_queue)
        if waiting is not None:
            raise ApiError(
                429,
                f"server overloaded: {waiting} requests already waiting; retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
