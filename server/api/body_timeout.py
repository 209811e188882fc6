"""408 for a request body that stalls: pure ASGI middleware around ``receive``.

A client that sends its headers and then part of a JSON body (or nothing) would otherwise hold
its handler, and everything it holds, for as long as the connection lives. Each ``receive`` of a
body chunk must arrive within ``idle_timeout_s`` (the ``upload_idle_timeout_s`` setting); when
one does not, the answer is 408 naming the timeout, whatever the inner layers made of the
interrupted read (FastAPI turns it into a 400, a JSON decoding layer might too: their answer is
dropped). Once the body is complete ``receive`` is passed through untouched: routes that wait
for ``http.disconnect`` (streams, long generations) wait as long as they need.

Multipart uploads are left to their own parser (``uploads.py``), which has the same timeout and
removes its temp file.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class _BodyStalled(Exception):
    pass


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, idle_timeout_s: float):
        self.app = app
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or _is_multipart(scope):
            await self.app(scope, receive, send)
            return
        complete = False
        stalled = False
        started = False

        async def timed_receive() -> Message:
            nonlocal complete, stalled
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                stalled = True
                raise _BodyStalled from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if stalled:  # the answer is the 408 below
                return
            started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not stalled:  # whatever an inner layer raised about the interrupted read is moot
                raise
        if stalled and not started:
            message = (
                f"the request body stalled: no data for {self.idle_timeout_s:g} s (upload_idle_timeout_s)"
            )
            await error_response(408, message, "body", headers={"Connection": "close"})(scope, receive, send)


def _is_multipart(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.lower().startswith(b"multipart/")
    return False
