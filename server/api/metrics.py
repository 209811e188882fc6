"""``GET /metrics``: Prometheus text exposition of this app's registry (``server.metrics``).

Authenticated like every other route when API keys are configured, and ``admin`` scope only: the
per-adapter series name adapter ids, which an ``infer`` key must not learn. Served while the model
loads too (``facet_ready`` is 0 then).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from server.metrics import CONTENT_TYPE

from .deps import AdminScope, RuntimeDep
from .errors import ApiError

router = APIRouter(tags=["metrics"], dependencies=[AdminScope])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format 0.0.4"}},
    summary="Prometheus metrics",
)
async def metrics(rt: RuntimeDep) -> Response:
    if rt.metrics is None:
        raise ApiError(404, "metrics are not enabled")
    body = await asyncio.to_thread(rt.metrics.render)  # sqlite read for the store size
    return Response(body, media_type=CONTENT_TYPE)
