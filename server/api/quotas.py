"""Per-API-key generation quotas: one key cannot take the whole batch or the whole queue.

The engine admits waiting requests strictly first-come first-served, so a key that sends 100
streams at once holds every batch slot and makes another key's short request wait for whole
generations (51 s was measured). With API keys configured, each key may have at most
``key_max_concurrent`` generations in flight (submitted and not yet finished: waiting or running,
streams while they are open) and at most ``key_max_queued`` of them still waiting for a batch
slot; beyond either, 429 with ``Retry-After`` naming the limit. The defaults (3/4 of
``max_batch_size``, a quarter of ``max_queue``) leave room for other keys while one key alone
still gets most of the server.

A slot is taken on the event loop right before the submit and released when the engine emits the
generation's ``FinishEvent`` (done, error, cancelled; a client that disconnects cancels its
generation), or when the submit itself fails. The release happens before the event reaches the
handler, so a client that saw its answer can submit again at once.
"""

from __future__ import annotations

import threading

from server.engine.requests import Event, EventSink, FinishEvent, GenerationRequest
from server.settings import Settings

from .errors import ApiError


def caller_key(request) -> str | None:
    """The label of the caller's API key (``AuthMiddleware``); None when no keys are configured."""
    return request.scope.get("state", {}).get("api_key")


class Slot:
    """One generation's hold on its key's quota; wraps the request's sink to see it end."""

    def __init__(self, quotas: KeyQuotas, key: str, inner: EventSink | None = None):
        self.quotas = quotas
        self.key = key
        self.inner = inner
        self.request: GenerationRequest | None = None  # set once engine.submit returned it
        self.released = False

    @property
    def waiting(self) -> bool:
        """Not yet admitted to the batch (the generator stamps ``admitted_time``)."""
        return self.request is None or self.request.admitted_time is None

    def emit(self, event: Event) -> None:
        if isinstance(event, FinishEvent):
            self.release()
        self.inner.emit(event)

    def release(self) -> None:
        self.quotas.release(self)


class KeyQuotas:
    def __init__(self, max_concurrent: int, max_queued: int, retry_after_s: int):
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._held: dict[str, set[Slot]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyQuotas:
        concurrent = settings.key_max_concurrent
        if concurrent is None:
            concurrent = max(1, settings.max_batch_size * 3 // 4)
        queued = (
            settings.key_max_queued
            if settings.key_max_queued is not None
            else max(1, settings.max_queue // 4)
        )
        return cls(concurrent, queued, settings.retry_after_s)

    def _refuse(self, message: str) -> ApiError:
        return ApiError(429, message, headers={"Retry-After": str(self.retry_after_s)})

    def acquire(self, key: str) -> Slot:
        """A slot for one more generation of ``key``, or 429 naming the limit it would exceed."""
        with self._lock:
            held = self._held.setdefault(key, set())
            if len(held) >= self.max_concurrent:
                raise self._refuse(
                    f"this API key already has {len(held)} generations in flight; its limit is "
                    f"{self.max_concurrent} (key_max_concurrent); retry when one finishes"
                )
            waiting = sum(1 for s in held if s.waiting)
            if waiting >= self.max_queued:
                raise self._refuse(
                    f"this API key already has {waiting} generations waiting for a batch slot; its limit "
                    f"is {self.max_queued} (key_max_queued); retry later"
                )
            slot = Slot(self, key)
            held.add(slot)
            return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if slot.released:
                return
            slot.released = True
            held = self._held.get(slot.key)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self._held[slot.key]

    def in_flight(self, key: str) -> int:
        with self._lock:
            return len(self._held.get(key, ()))
