"""Connection guards under the ASGI app: a request-head timeout and a connection cap.

uvicorn's HTTP/1.1 protocol (h11) arms no timer until a first response has been sent: a client
that connects and sends nothing, or half a request head, holds its connection (and a file
descriptor) for ever. ``GuardedH11Protocol`` closes such a connection after
``header_timeout_s``, answering 408 when part of a head had arrived. Idle keep-alive connections
are closed after ``keep_alive_s`` as before (uvicorn's own timer).

The connection cap answers a request on a connection beyond ``max_connections`` with a 503 in
the usual error shape plus ``Retry-After``, written by the protocol itself (no ASGI task, no
app code), then closes it. uvicorn's ``limit_concurrency`` does much the same but with a plain
text body and no ``Retry-After``, which is why it is not used.

    config = uvicorn_config(app, settings)   # python -m server; tests serve the same config
"""

from __future__ import annotations

import asyncio
import json
import resource

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings

HEAD_END = b"\r\n\r\n"
# How long a refused connection may keep sending before it is closed (its request is drained
# first, so the client reads the 503 instead of a reset).
REFUSED_LINGER_S = 2.0


def _canned(status: int, reason: str, message: str, type_: str, extra: dict[str, str]) -> bytes:
    """A complete HTTP/1.1 error response with ``Connection: close``, in the API's error shape."""
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)), **extra}
    headers["connection"] = "close"
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def default_max_connections() -> int:
    """Half the soft open-file limit: the other half stays for adapters, the store and logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, soft // 2)


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with a request-head deadline and a connection cap (class attributes, set by
    ``guarded_protocol``)."""

    header_timeout_s: float = 10.0
    max_connections: int | None = None
    refusal: bytes = b""
    head_timeout: bytes = b""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._refused_head = bytearray()

    # ---- connection cap --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts this connection in self.connections
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._refused = True
        self._update_head_timer()

    def _refuse(self, data: bytes) -> None:
        """Read the request head, answer 503 and close (after a short linger for its body)."""
        if self._refused_head is None:  # answered already: discard what is still coming
            return
        self._refused_head += data
        if HEAD_END not in self._refused_head and len(self._refused_head) < (64 << 10):
            return
        self._refused_head = None
        self._cancel_head_timer()
        self.transport.write(self.refusal)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the end of the answer and closes
            self.loop.call_later(REFUSED_LINGER_S, self.transport.close)
        else:
            self.transport.close()

    # ---- request-head deadline -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._refuse(data)
            return
        super().data_received(data)
        self._update_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _update_head_timer(self) -> None:
        if not self._waiting_for_head() and not self._refused:
            self._cancel_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._refused and not self._waiting_for_head():
            return
        partial = bool(self._refused_head) if self._refused else bool(self.conn.trailing_data[0])
        if partial:  # part of a head arrived: say why the connection ends
            self.transport.write(self.head_timeout)
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` subclass carrying ``settings``' limits."""
    cap = settings.max_connections if settings.max_connections is not None else default_max_connections()
    retry = {"retry-after": str(settings.retry_after_s)}
    attrs = {
        "header_timeout_s": settings.header_timeout_s,
        "max_connections": cap,
        "refusal": _canned(
            503,
            "Service Unavailable",
            f"too many open connections (max_connections={cap})",
            "not_ready",
            retry,
        ),
        "head_timeout": _canned(
            408,
            "Request Timeout",
            f"no complete request head within {settings.header_timeout_s:g} s (header_timeout_s)",
            "request_timeout",
            {},
        ),
    }
    return type("FacetH11Protocol", (GuardedH11Protocol,), attrs)


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration ``python -m server`` runs ``app`` with (tests start the same)."""
    options = {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "server_header": False,
        "log_config": None,  # the caller's logging set-up stays
        **overrides,
    }
    return uvicorn.Config(app, **options)
