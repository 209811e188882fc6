"""Dependencies shared by the routers (``Annotated`` aliases and scope checks). Routes get every
stateful object here, from the runtime; they never build one."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from adapters_store.store import AdapterStore
from server.adapters_service import AdapterService
from server.jobs.files import FileStore
from server.jobs.runner import JobRunner
from server.runtime import Runtime

from .errors import ApiError
from .schemas import AdapterId


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


# The objects the composition root (server.runtime) built once the engine and the store exist;
# behind ReadyRuntime, so they are there whenever these resolve.
def get_adapters(rt: ReadyRuntime) -> AdapterService:
    return rt.adapters


def get_files(rt: ReadyRuntime) -> FileStore:
    return rt.files


def get_jobs(rt: ReadyRuntime) -> JobRunner:
    return rt.jobs


AdaptersDep = Annotated[AdapterService, Depends(get_adapters)]
FilesDep = Annotated[FileStore, Depends(get_files)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
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
