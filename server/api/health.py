"""``/health`` (the process answers) and ``/ready`` (model loaded, warmed up, engine running,
not shutting down). Both are open even when API keys are configured."""

from __future__ import annotations

from fastapi import APIRouter

from server.engine.loader import dtype_name

from .deps import RuntimeDep
from .schemas import ErrorBody, Health, Ready

router = APIRouter(tags=["health"])


# HEAD too: load balancers and uptime checks probe with it (the GET answer without its body;
# left out of the schema, where it would repeat the GET operation).
@router.get("/health", response_model=Health, summary="Liveness: the server process answers")
@router.head("/health", include_in_schema=False)
async def health():
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Ready,
    responses={503: {"model": ErrorBody, "description": "loading, failed to start, or shutting down"}},
    summary="Readiness: the model is loaded and warmed up and the engine runs",
)
@router.head("/ready", include_in_schema=False)
async def ready(rt: RuntimeDep):
    rt.check_ready()
    base = rt.engine.base
    dtype, device = dtype_name(base.dtype), base.device.type
    return {"status": "ready", "model": base.name, "dtype": dtype, "device": device}
