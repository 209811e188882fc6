"""``/files``: training data uploaded once and used by fine-tune jobs (``training_file``). Admin scope.

    POST   /files                 multipart: ``file`` (JSONL) and ``purpose`` ("fine-tune");
                                  201 + the file object; 422 naming the bad line; 413 above
                                  ``max_file_bytes``
    GET    /files                 every file, newest first
    GET    /files/{file_id}       one file object
    GET    /files/{file_id}/content  the JSONL as uploaded
    DELETE /files/{file_id}       jobs already submitted keep their own copy of the data

Shapes follow OpenAI's Files API (``{"id": "file-...", "object": "file", "bytes", "created_at",
"filename", "purpose"}``) plus ``records``, the number of examples.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from starlette.responses import Response

from server.jobs.files import FileInvalid, FileNotFound

from .deps import AdminScope, FilesDep, ReadyRuntime
from .errors import ApiError
from .schemas import ErrorBody
from .uploads import read_form

router = APIRouter(prefix="/files", tags=["files"], dependencies=[AdminScope])
_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 422, 503)}
_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL records"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


FileId = Annotated[str, PathParam(max_length=64, description="the file's id (file-...)")]


async def _on_file(operation, file_id: str):
    """``operation(file_id)`` in a worker thread; an unknown id is a 404."""
    try:
        return await asyncio.to_thread(operation, file_id)
    except FileNotFound:
        raise ApiError(404, "no file with this id", "file_id") from None


@router.post(
    "",
    status_code=201,
    summary="Upload a JSONL training file",
    openapi_extra=_UPLOAD_DOC,
    responses={**_ERRORS, **{c: {"model": ErrorBody} for c in (400, 408, 413, 415)}},
)
async def upload_file(request: Request, rt: ReadyRuntime, files: FilesDep):
    caps = {"file": rt.settings.max_file_bytes, "purpose": 64}
    parts = await read_form(request, caps, idle_timeout_s=rt.settings.upload_idle_timeout_s)
    try:
        purpose = bytes(parts["purpose"].buffer).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "purpose must be UTF-8 text", "body.purpose") from None
    data = bytes(parts["file"].buffer)
    try:
        return await asyncio.to_thread(files.put, parts["file"].filename, purpose, data)
    except FileInvalid as e:
        raise ApiError(422, e.message, f"body.{e.where}") from None


@router.get("", summary="List training files, newest first", responses=_ERRORS)
async def list_files(files: FilesDep):
    return {"object": "list", "data": await asyncio.to_thread(files.list)}


@router.get("/{file_id}", summary="One training file", responses=_ERRORS)
async def get_file(file_id: FileId, files: FilesDep):
    return await _on_file(files.get, file_id)


@router.get(
    "/{file_id}/content",
    summary="A training file's content (JSONL)",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"application/jsonl": {}}, "description": "the JSONL"}},
)
async def file_content(file_id: FileId, files: FilesDep):
    return Response(await _on_file(files.text, file_id), media_type="application/jsonl")


@router.delete("/{file_id}", summary="Delete a training file", responses=_ERRORS)
async def delete_file(file_id: FileId, files: FilesDep):
    return await _on_file(files.delete, file_id)
