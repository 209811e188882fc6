"""Dependencies shared by the routers (``Annotated`` aliases and scope checks)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Request

from adapters_store.store import AdapterStore

from .errors import ApiError
from .runtime import Runtime
from .schemas import AdapterId

T = TypeVar("T")


_ONCE = threading.Lock()


def app_singleton(app, name: str, make: Callable[[], T]) -> T:
    """``app.state.<name>``, made by ``make()`` the first time (once, even when asked concurrently)."""
    value = getattr(app.state, name, None)
    if value is None:
        with _ONCE:
            value = getattr(app.state, name, None)
            if value is None:
                value = make()
                setattr(app.state, name, value)
    return value


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def ready_runtime(rt: RuntimeDep) -> Runtime:
    """The runtime, or 503 while the model loads, after a failed start and while shutting down."""
    rt.check_ready()
    return rt


ReadyRuntime = Annotated[Runtime, Depends(ready_runtime)]


def get_store(rt: ReadyRuntime) -> AdapterStore:
    return rt.store


StoreDep = Annotated[AdapterStore, Depends(get_store)]
AdapterIdPath = Annotated[AdapterId, Path(description="adapter id")]


def granted_scope(request: Request) -> str | None:
    """The caller's scope, set by ``AuthMiddleware`` (``admin`` when no keys are configured)."""
    return request.scope.get("state", {}).get("api_scope")


def require_scope(scope: str):
    """Dependency: the caller's key (set by ``AuthMiddleware``) must carry ``scope`` or ``admin``.
    ``jsonbody.JSONRoute`` finds it by ``api_scope`` and runs it before reading the body."""

    def check(request: Request) -> None:
        granted = granted_scope(request)
        if granted != "admin" and granted != scope:
            raise ApiError(403, f"this API key lacks the '{scope}' scope")

    check.api_scope = scope
    return Depends(check)


InferScope = require_scope("infer")
AdminScope = require_scope("admin")
