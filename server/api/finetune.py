"""``/fine-tunes``: train an adapter on the resident model in the background. Admin scope.

    POST /fine-tunes                  202 + the job (queued); 422 before any work if anything is invalid
    GET  /fine-tunes                  jobs, newest first (paginated)
    GET  /fine-tunes/{job_id}         one job (status, step, epoch, losses, tokens/s, ETA, result, error)
    GET  /fine-tunes/{job_id}/events  its events (created, started, step, eval, checkpoint, ...);
                                      ?after=seq; with Accept: text/event-stream (or ?stream=true):
                                      Server-Sent Events that follow the job to its terminal event
    GET  /fine-tunes/{job_id}/loss.png  the train (blue) and validation (orange) loss curves
    POST /fine-tunes/{job_id}/cancel  queued: cancelled at once; running: stops before its next step

``{job_id}`` is the job's id (``ft-...``, returned by POST).

Training data comes inline (``training_data``) or as a file uploaded earlier (``training_file``,
``server.api.files``); the same for validation. Errors name the field and the line.
``training_data`` may be JSONL text or a list of records (errors then name the record's position
from 1 as its ``line``). The request body is capped by ``max_body_bytes`` like every JSON body.

The runner (``server.jobs.runner``) is built by the composition root (``server.runtime``) during
start-up (so jobs a previous process left running are resumed or failed at once), with its
SQLite file under ``<data_dir>/jobs``; the app's lifespan stops it on shutdown (a running job
pauses and resumes on the next start). The finished adapter is stored through the adapter
service as ``adapter_id`` (checkpoints as ``adapter_id@step``) and is served at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from server.jobs.files import FileNotFound, FileStore
from server.jobs.runner import (
    TERMINAL,
    JobConflict,
    JobInvalid,
    JobNotFound,
    JobQueueFull,
    JobRunner,
    JobSpec,
)
from server.methods import available_methods

from .deps import AdminScope, FilesDep, JobsDep, ReadyRuntime
from .errors import ApiError
from .inference import EventStream, sse
from .jsonbody import JSONRoute
from .plot import TRAIN_COLOR, VAL_COLOR, plot_png
from .schemas import MAX_OFFSET, ErrorBody

# Documented on every route (tests/reliability/test_schema_fuzz.py checks each answer against it).
_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 422, 503)}
_NOT_FOUND = {404: {"model": ErrorBody}}
router = APIRouter(
    prefix="/fine-tunes",
    tags=["fine-tunes"],
    dependencies=[AdminScope],
    responses=_ERRORS,
    route_class=JSONRoute,
)


class FineTuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(max_length=128, description="id the trained adapter is stored under")
    method: str = Field(max_length=32, description="adapter family: one of " + ", ".join(available_methods()))
    method_config: dict[str, Any] = Field(
        default_factory=dict, description='family config, e.g. {"r": 8}; defaults per family'
    )
    target_modules: list[str] | str | None = Field(None, description="default: every adaptable linear")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="epochs, max_steps, learning_rate, batch_size, seed, grad_accum, checkpoint_every,"
        " eval_every, ... (see docs/api.md)",
    )
    training_data: str | list[dict[str, Any]] | None = Field(
        None, description='JSONL text, or a list of {"prompt","completion"} / {"messages"} records'
    )
    training_file: str | None = Field(None, max_length=64, description="id of a file from POST /files")
    validation_data: str | list[dict[str, Any]] | None = None
    validation_file: str | None = Field(None, max_length=64, description="id of a file from POST /files")

    @model_validator(mode="after")
    def _one_source_each(self):
        if (self.training_data is None) == (self.training_file is None):
            raise ValueError("give exactly one of training_data and training_file")
        if self.validation_data is not None and self.validation_file is not None:
            raise ValueError("give at most one of validation_data and validation_file")
        return self


def _jsonl(data: str | list | None) -> str | None:
    if data is None or isinstance(data, str):
        return data
    return "".join(json.dumps(r) + "\n" for r in data)


def refuse_if_a_job_publishes(runner: JobRunner, adapter_id: str) -> None:
    """409 naming the job when a queued or running fine-tune will store ``adapter_id``: an upload
    there would be replaced when the job finishes (the job also checks again when it publishes)."""
    job = runner.active_job_for(adapter_id)
    if job is not None:
        raise ApiError(
            409,
            f"fine-tune job {job['id']} ({job['status']}) will store adapter '{job['adapter_id']}'; "
            "wait for it to finish, or cancel it",
            "body.adapter_id",
        )


RunnerDep = JobsDep


JobName = Annotated[str, PathParam(max_length=64, description="the job's id (ft-...)")]


def _not_found() -> ApiError:
    return ApiError(404, "no fine-tune job with this id", "job_id")


def _file_text(files: FileStore, file_id: str | None, field: str) -> str | None:
    if file_id is None:
        return None
    try:
        return files.text(file_id)
    except FileNotFound:
        raise ApiError(422, "no file with this id (upload it with POST /files)", f"body.{field}") from None


@router.post(
    "",
    status_code=202,
    summary="Start a fine-tune job",
    responses={code: {"model": ErrorBody} for code in (400, 401, 403, 413, 415, 422, 429, 503)},
)
async def create_job(
    body: FineTuneRequest,
    response: Response,
    rt: ReadyRuntime,
    runner: RunnerDep,
    files: FilesDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description="retry-safe submission: the same key and body return the same job",
        ),
    ] = None,
):
    train_text = await asyncio.to_thread(_file_text, files, body.training_file, "training_file")
    val_text = await asyncio.to_thread(_file_text, files, body.validation_file, "validation_file")
    spec = JobSpec(
        adapter_id=body.adapter_id,
        method=body.method,
        training_data=train_text if train_text is not None else _jsonl(body.training_data),
        config=body.method_config,
        target_modules=body.target_modules,
        hyperparameters=body.hyperparameters,
        validation_data=val_text if val_text is not None else _jsonl(body.validation_data),
    )
    try:
        job = await asyncio.to_thread(runner.submit, spec, idempotency_key)
    except JobQueueFull as e:
        raise ApiError(429, str(e), headers={"Retry-After": str(rt.settings.retry_after_s)}) from None
    except JobInvalid as e:
        if e.where == "Idempotency-Key":
            raise ApiError(422, e.message, "header.Idempotency-Key") from None
        where = "method_config" + e.where[len("config") :] if e.where.startswith("config") else e.where
        if where.startswith("training_data") and body.training_file is not None:
            where = "training_file"
        if where.startswith("validation_data") and body.validation_file is not None:
            where = "validation_file"
        raise ApiError(422, e.message, f"body.{where}") from None
    if job.pop("replayed", False):
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", summary="List fine-tune jobs, newest first")
async def list_jobs(
    runner: RunnerDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
):
    jobs, total = await asyncio.to_thread(runner.list, offset, limit)
    return {"jobs": jobs, "total": total, "offset": offset, "limit": limit}


@router.get("/{job_id}", summary="One fine-tune job", responses=_NOT_FOUND)
async def get_job(job_id: JobName, runner: RunnerDep):
    try:
        return await asyncio.to_thread(runner.get, job_id)
    except JobNotFound:
        raise _not_found() from None


STREAM_POLL_S = 0.2
STREAM_KEEPALIVE_S = 15.0

_EVENTS_DOC = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON `{events}`; with `Accept: text/event-stream` or `?stream=true`: one SSE"
        " event per job event (`id` = seq, `event` = type), ending after the terminal event",
    }
}


@router.get("/{job_id}/events", summary="Events of a fine-tune job", responses={**_EVENTS_DOC, **_NOT_FOUND})
async def job_events(
    job_id: JobName,
    request: Request,
    runner: RunnerDep,
    after: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
):
    try:
        events = await asyncio.to_thread(runner.events, job_id, after, limit)
    except JobNotFound:
        raise _not_found() from None
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        return EventStream(follow_events(runner, job_id, after, events), on_close=lambda: None)
    return {"events": events}


def _sse_event(event: dict) -> str:
    return f"id: {event['seq']}\n" + sse(event, event["type"])


async def follow_events(
    runner: JobRunner,
    job_id: str,
    after: int = 0,
    first: list[dict] | None = None,
    poll_s: float = STREAM_POLL_S,
    keepalive_s: float = STREAM_KEEPALIVE_S,
) -> AsyncIterator[str]:
    """The job's events after ``after`` as SSE text, then new ones as they are written (polled
    every ``poll_s`` in a worker thread), ending after the terminal event. A comment line goes
    out after ``keepalive_s`` without events, so a client that went away is noticed (the response
    stops when sending fails or the client disconnects)."""
    cursor = after
    pending = first
    idle = 0.0
    while True:
        if pending is None:
            try:
                pending = await asyncio.to_thread(runner.events, job_id, cursor, 1000)
            except JobNotFound:  # deleted meanwhile
                return
        for event in pending:
            cursor = event["seq"]
            yield _sse_event(event)
            if event["type"] in TERMINAL:
                return
        if pending:
            idle = 0.0
            pending = None
            continue
        pending = None
        try:  # a terminal job whose terminal event is somehow missing must not stream forever
            job = await asyncio.to_thread(runner.get, job_id)
        except JobNotFound:
            return
        if job["status"] in TERMINAL:
            rest = await asyncio.to_thread(runner.events, job_id, cursor, 10000)
            for event in rest:
                yield _sse_event(event)
            if not any(e["type"] in TERMINAL for e in rest):
                yield sse({"status": job["status"]}, "end")
            return
        await asyncio.sleep(poll_s)
        idle += poll_s
        if idle >= keepalive_s:
            idle = 0.0
            yield ": keep-alive\n\n"


@router.get(
    "/{job_id}/loss.png",
    summary="Loss curve of a fine-tune job (PNG)",
    responses={
        200: {"content": {"image/png": {}}, "description": "train (blue), validation (orange)"},
        **_NOT_FOUND,
    },
    response_class=Response,
)
async def job_loss_png(job_id: JobName, runner: RunnerDep):
    try:
        train, val = await asyncio.to_thread(runner.loss_curve, job_id)
    except JobNotFound:
        raise _not_found() from None
    png = await asyncio.to_thread(plot_png, [(train, TRAIN_COLOR), (val, VAL_COLOR)])
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a queued or running fine-tune job",
    responses={**_NOT_FOUND, 409: {"model": ErrorBody}},
)
async def cancel_job(job_id: JobName, runner: RunnerDep):
    try:
        return await asyncio.to_thread(runner.cancel, job_id)
    except JobNotFound:
        raise _not_found() from None
    except JobConflict as e:
        raise ApiError(409, str(e), "job_id") from None
