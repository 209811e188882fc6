"""``/adapters``: upload (multipart), list, inspect, download files, delete. Admin scope.

The store validates and versions uploads; the adapter service (``server.adapters_service``)
tells the engine to forget a replaced or deleted version (requests already running keep theirs
until they finish) and owns pins. These routes only translate HTTP to its calls.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import StreamingResponse

from adapters_store.errors import StoreError
from adapters_store.ids import CONFIG_NAME, WEIGHTS_NAME, check_new_id

from .deps import AdapterIdPath, AdaptersDep, AdminScope, JobsDep, ReadyRuntime, StoreDep
from .errors import ApiError
from .finetune import refuse_if_a_job_publishes
from .schemas import MAX_OFFSET, AdapterInfo, AdapterList, ErrorBody
from .uploads import read_adapter_upload

router = APIRouter(prefix="/adapters", tags=["adapters"], dependencies=[AdminScope])

_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 503)}
_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_id", "config", "weights"],
                    "properties": {
                        "adapter_id": {"type": "string", "description": "new or existing adapter id"},
                        "config": {"type": "string", "format": "binary", "description": CONFIG_NAME},
                        "weights": {"type": "string", "format": "binary", "description": WEIGHTS_NAME},
                    },
                }
            }
        },
    }
}
_CHUNK = 1 << 20


@router.post(
    "",
    status_code=201,
    response_model=AdapterInfo,
    responses={**_ERRORS, **{c: {"model": ErrorBody} for c in (400, 408, 413, 415)}},
    openapi_extra=_UPLOAD_DOC,
    summary="Upload an adapter (a new id, or a new version of an existing one)",
)
async def upload_adapter(request: Request, rt: ReadyRuntime, adapters: AdaptersDep, jobs: JobsDep):
    limits = adapters.store.limits
    upload = await read_adapter_upload(
        request,
        rt.uploads_dir,
        limits.max_config_bytes,
        limits.max_weights_bytes,
        idle_timeout_s=rt.settings.upload_idle_timeout_s,
    )
    try:
        try:
            check_new_id(upload.adapter_id, rt.engine.base.name)
        except StoreError as e:
            raise ApiError(422, e.message, "body.adapter_id") from None
        await asyncio.to_thread(refuse_if_a_job_publishes, jobs, upload.adapter_id)  # 409
        record = await asyncio.to_thread(adapters.put, upload.adapter_id, upload.config, upload.weights)
    finally:
        await asyncio.to_thread(upload.discard)
    return adapters.describe(record).to_json()


@router.get("", response_model=AdapterList, responses=_ERRORS, summary="List adapters (paginated)")
async def list_adapters(
    adapters: AdaptersDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
):
    views, total = await asyncio.to_thread(adapters.list, offset, limit)
    return {"adapters": [v.to_json() for v in views], "total": total, "offset": offset, "limit": limit}


@router.get("/{adapter_id}", response_model=AdapterInfo, responses=_ERRORS, summary="One adapter")
async def get_adapter(adapter_id: AdapterIdPath, adapters: AdaptersDep):
    return (await asyncio.to_thread(adapters.get, adapter_id)).to_json()


def _open(store, adapter_id: str, name: str) -> tuple[BinaryIO, int]:
    # A re-upload may remove the file between lookup and open: look again once.
    for attempt in range(2):
        try:
            fh = open(store.file_path(adapter_id, name), "rb")  # noqa: SIM115 - closed by the stream
        except FileNotFoundError:
            if attempt:
                raise ApiError(404, "no adapter with this id", "adapter_id") from None
            continue
        return fh, os.fstat(fh.fileno()).st_size
    raise AssertionError("unreachable")


async def _chunks(fh: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
            yield chunk
    finally:
        fh.close()


@router.get(
    "/{adapter_id}/files/{name}",
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}, "application/json": {}}}},
    summary="Download adapter_config.json or adapter_model.safetensors",
)
async def download_file(
    adapter_id: AdapterIdPath,
    name: Annotated[Literal["adapter_config.json", "adapter_model.safetensors"], Path()],
    store: StoreDep,
):
    fh, size = await asyncio.to_thread(_open, store, adapter_id, name)
    media = "application/json" if name == CONFIG_NAME else "application/octet-stream"
    headers = {"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(_chunks(fh), media_type=media, headers=headers)


@router.put("/{adapter_id}/pin", response_model=AdapterInfo, responses=_ERRORS, summary="Pin an adapter")
async def pin_adapter(adapter_id: AdapterIdPath, adapters: AdaptersDep):
    """Keep every version of this adapter in host and device memory once loaded (until unpinned or
    deleted; the ``pinned_adapters`` setting pins ids at start-up). Pinned adapters that fill the
    device budget make requests for others answer 503."""
    return (await asyncio.to_thread(adapters.pin, adapter_id)).to_json()


@router.delete("/{adapter_id}/pin", response_model=AdapterInfo, responses=_ERRORS, summary="Unpin an adapter")
async def unpin_adapter(adapter_id: AdapterIdPath, adapters: AdaptersDep):
    return (await asyncio.to_thread(adapters.unpin, adapter_id)).to_json()


@router.delete("/{adapter_id}", response_model=AdapterInfo, responses=_ERRORS, summary="Delete an adapter")
async def delete_adapter(adapter_id: AdapterIdPath, adapters: AdaptersDep):
    return (await asyncio.to_thread(adapters.delete, adapter_id)).to_json()
