"""Pure ASGI middleware: bearer-key authentication and request body caps.

Both run before any route reads the body, so an unauthenticated or oversized request costs
almost nothing: no JSON parse, no multipart parse, no temp file.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

SCOPES = ("infer", "admin")
OPEN_PATHS = frozenset({"/health", "/ready"})


def load_api_keys(entries: list[str], keys_file: Path | None) -> dict[str, str]:
    """``SCOPE:TOKEN`` entries (settings and/or a file, one per line, ``#`` comments) -> {token: scope}."""
    lines = list(entries)
    if keys_file is not None:
        lines += keys_file.read_text().splitlines()
    keys: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        scope, sep, token = line.partition(":")
        token = token.strip()
        if not sep or scope.strip() not in SCOPES or not token:
            # Never echo the line: it may hold a secret.
            raise ValueError(f"API key entry {n} must look like 'infer:TOKEN' or 'admin:TOKEN'")
        keys[token] = scope.strip()
    return keys


class AuthMiddleware:
    """When keys are configured, every path except /health and /ready needs ``Authorization:
    Bearer <key>`` (401 otherwise). The key's scope lands in ``scope["state"]["api_scope"]``;
    routes check it with ``deps.require_scope`` (403 on the wrong scope), and a label naming the
    key without revealing it (``key-<n>``, its place in the configuration) in
    ``scope["state"]["api_key"]``, for per-key quotas. Without keys every caller is ``admin``
    and has no label. Two or more Authorization headers are a 400, keys or not."""

    def __init__(self, app: ASGIApp, keys: dict[str, str]):
        self.app = app
        self._keys = [(token.encode(), scope, f"key-{n}") for n, (token, scope) in enumerate(keys.items(), 1)]

    def _key_of(self, header: bytes | None) -> tuple[str, str] | None:
        """(scope, label) of the bearer key in ``header``, or None."""
        if header is None:
            return None
        kind, _, token = header.partition(b" ")
        if kind.lower() != b"bearer" or not token:
            return None
        found = None
        for key, scope, label in self._keys:  # compare against every key: no timing hint of a near miss
            if hmac.compare_digest(key, token.strip()):
                found = scope, label
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) > 1 and scope["path"] not in OPEN_PATHS:
            # Which key would count? Proxies and clients disagree: refuse rather than guess.
            response = error_response(400, "more than one Authorization header", "header.Authorization")
            await response(scope, receive, send)
            return
        if not self._keys:
            state["api_scope"] = "admin"
        elif scope["path"] not in OPEN_PATHS:
            header = given[0] if given else None
            found = self._key_of(header)
            if found is None:
                message = "missing API key" if header is None else "invalid API key"
                response = error_response(401, message, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            state["api_scope"], state["api_key"] = found
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over its cap: at once from Content-Length, or while it streams in.

    ``caps`` maps (method, path) to a cap; everything else gets ``default_cap``.
    """

    def __init__(self, app: ASGIApp, default_cap: int, caps: dict[tuple[str, str], int]):
        self.app = app
        self.default_cap = default_cap
        self.caps = caps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        cap = self.caps.get((scope["method"], scope["path"]), self.default_cap)
        too_large = error_response(413, f"request body exceeds {cap} bytes", "body")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await too_large(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app made of the interrupted read, the answer is 413
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await too_large(scope, receive, send)
