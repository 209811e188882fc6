"""Run HTTP requests against an ASGI app in this process, streaming the response back.

An engine replica holds one whole Facet app (``create_app``) and no HTTP server of its own: the
ingress hands it each request as plain data and gets back ``("start", status, headers)`` and then
the body chunks, as the app sends them, so Server-Sent Events stream through instead of being
buffered (httpx's ``ASGITransport`` collects the whole body first). The app's lifespan (model
load, engine start, shutdown) is driven here too.

Disconnects: after the body, ``receive()`` blocks until the caller goes away (the consumer stops
iterating or is cancelled), then answers ``http.disconnect``, which is what the app's generation
routes watch to cancel their engine requests (``server/api/inference.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("facet.cluster")

# How long a request's app task may take to wind down after its caller went away (the
# generation routes cancel their engine requests on http.disconnect well within this).
DISCONNECT_GRACE_S = 5.0
_END = object()


@dataclass
class HttpRequest:
    """One HTTP request as data (what crosses from the ingress to a replica)."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)


class LocalASGI:
    """An ASGI app run in-process: ``startup``, many ``stream``, ``shutdown``."""

    def __init__(self, app: Any):
        self.app = app
        self._state: dict = {}
        self._lifespan_task: asyncio.Task | None = None
        self._lifespan_in: asyncio.Queue = asyncio.Queue()
        self._lifespan_out: asyncio.Queue = asyncio.Queue()

    # ---- lifespan ----------------------------------------------------------------------------
    async def startup(self) -> None:
        """Run the app's lifespan startup; raises if the app reports it failed."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self._state}
        self._lifespan_task = asyncio.create_task(
            self.app(scope, self._lifespan_in.get, self._lifespan_out.put)
        )
        await self._lifespan_in.put({"type": "lifespan.startup"})
        message = await self._lifespan_out.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"app start-up failed: {message.get('message', message['type'])}")

    async def shutdown(self, timeout: float = 60.0) -> None:
        if self._lifespan_task is None or self._lifespan_task.done():
            return
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._lifespan_out.get(), timeout)
        except TimeoutError:
            log.warning("app shutdown did not finish within %.0f s", timeout)
            self._lifespan_task.cancel()

    # ---- requests ----------------------------------------------------------------------------
    def _scope(self, req: HttpRequest) -> dict:
        path = req.path if req.path.startswith("/") else "/" + req.path
        return {
            "type": "http",
            # spec 2.3: Starlette's streaming responses then watch receive() for the disconnect
            # (from 2.4 on they wait for send() to fail instead)
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": req.method.upper(),
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("utf-8"),
            "query_string": req.query,
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
            "client": tuple(req.client),
            "server": ("127.0.0.1", 0),
            "state": dict(self._state),
        }

    async def stream(self, req: HttpRequest) -> AsyncIterator[tuple | bytes]:
        """Yield ``("start", status, [(name, value)])`` once, then the body's non-empty chunks.

        An app that fails before answering yields a 500 start; one that fails mid-body ends the
        stream early (the client sees a truncated body, as from a server that died)."""
        outbox: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(self._scope(req), receive, send)
            except Exception:
                log.exception("app failed on %s %s", req.method, req.path)
            finally:
                outbox.put_nowait(_END)

        async def send(message: dict) -> None:
            if gone.is_set():
                raise OSError("the caller went away")  # what a server's send does then
            await outbox.put(message)

        task = asyncio.create_task(run())
        started = False
        try:
            while True:
                message = await outbox.get()
                if message is _END:
                    break
                if message["type"] == "http.response.start":
                    started = True
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
                    yield ("start", message["status"], headers)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
            if not started:
                yield ("start", 500, [("content-type", "application/json")])
                yield b'{"error": {"type": "internal", "message": "the replica failed on this request"}}'
        finally:
            gone.set()  # the caller is done (or gone): the app's disconnect watchers fire
            await _wind_down(task)


async def _wind_down(task: asyncio.Task) -> None:
    """Let the request's task finish after a disconnect; cancel it if it does not."""
    if task.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
    except (TimeoutError, asyncio.CancelledError):
        task.cancel()
