"""The HTTP side of the Prometheus metrics (``server/metrics.py``): ``MetricsMiddleware`` counts
and times every request by route template, method and status; ``route_templates`` lists the
templates a request answered before routing is matched against."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import METHODS, UNMATCHED_ROUTE, Metrics


def route_templates(app) -> list[str]:
    """Path templates of every route of a FastAPI app: the API's (from its OpenAPI schema) and
    the plain ones (docs, schema)."""
    paths = list(app.openapi().get("paths", {}))
    paths += [r.path for r in app.routes if isinstance(getattr(r, "path", None), str)]
    return list(dict.fromkeys(paths))


class MetricsMiddleware:
    """Counts every HTTP request (401s and 413s from the inner middleware included) by route
    template, method and status; times it until the response is sent.

    The template is the matched route's (``scope["route"]``); a request answered before routing
    (no key, body too large) is matched against ``templates()`` here."""

    def __init__(self, app: ASGIApp, metrics: Metrics, templates: Callable[[], list[str]]):
        self.app = app
        self.metrics = metrics
        self._templates = templates
        self._compiled: list[tuple[re.Pattern, str]] | None = None

    def _template(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if self._compiled is None:
            self._compiled = [(compile_path(t)[0], t) for t in self._templates()]
        for regex, template in self._compiled:
            if regex.match(scope["path"]):
                return template
        return UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self._template(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - t0)
