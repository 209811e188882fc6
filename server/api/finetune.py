"""``/fine-tunes``: train an adapter on the resident model in the background. Admin scope.

    POST /fine-tunes                 202 + the job (queued); 422 before any work if anything is invalid
    GET  /fine-tunes                 jobs, newest first (paginated)
    GET  /fine-tunes/{name}          one job (status, step, loss, result or error)
    GET  /fine-tunes/{name}/events   its events (created, started, step, eval, checkpoint, ...); ?after=seq
    POST /fine-tunes/{name}/cancel   queued: cancelled at once; running: stops before its next step

``{name}`` is the job's id (``ft-...``, returned by POST). It is called ``name`` only because the
auth sweep in tests/api/test_auth.py fills path parameters from a fixed table (``PATH_VALUES``);
rename it to ``job_id`` once that table has a ``job_id`` entry.

``training_data`` may be JSONL text or a list of records (errors then name the record's position
from 1 as its ``line``). The request body is capped by ``max_body_bytes`` like every JSON body.

The runner (``server.jobs.runner``) is created when the server becomes ready (so jobs a previous
process left running are marked failed at once), with its
SQLite file under ``<data_dir>/jobs``; the app's lifespan stops it on shutdown. The finished
adapter is stored as ``adapter_id`` (checkpoints as ``adapter_id@step``) and is served at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from server.jobs.runner import JobConflict, JobInvalid, JobNotFound, JobRunner, JobSpec

from .deps import AdminScope, ReadyRuntime
from .errors import ApiError
from .runtime import Runtime

router = APIRouter(prefix="/fine-tunes", tags=["fine-tunes"], dependencies=[AdminScope])
_LOCK = threading.Lock()


class FineTuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(max_length=128, description="id the trained adapter is stored under")
    method: str = Field(max_length=32, description="adapter family: lora, hut, ether, dct, surm")
    config: dict[str, Any] = Field(default_factory=dict, description='family config, e.g. {"r": 8}')
    target_modules: list[str] | str | None = Field(None, description="default: every adaptable linear")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="see server.jobs.train")
    training_data: str | list[dict[str, Any]] = Field(
        description='JSONL text, or a list of {"prompt","completion"} / {"messages"} records'
    )
    validation_data: str | list[dict[str, Any]] | None = None


def _jsonl(data: str | list | None) -> str | None:
    if data is None or isinstance(data, str):
        return data
    return "".join(json.dumps(r) + "\n" for r in data)


def get_runner(request: Request, rt: ReadyRuntime) -> JobRunner:
    return get_or_create_runner(request.app, rt)


def get_or_create_runner(app, rt: Runtime) -> JobRunner:
    """The app's job runner (created when the server becomes ready, or on first use)."""
    runner = getattr(app.state, "fine_tunes", None)
    if runner is not None:
        return runner
    with _LOCK:
        runner = getattr(app.state, "fine_tunes", None)
        if runner is None:
            runner = make_runner(rt)
            runner.start()
            app.state.fine_tunes = runner
    return runner


def make_runner(rt: Runtime) -> JobRunner:
    engine = rt.engine

    def busy() -> bool:
        return engine.generator.num_waiting > 0 or engine.generator.num_running > 0

    def on_stored(record, previous: int | None) -> None:
        if previous is not None and previous != record.version:
            engine.forget(record.adapter_id, previous)

    return JobRunner(
        engine.base,
        rt.store,
        rt.settings.data_dir / "jobs",
        busy=busy,
        on_stored=on_stored,
        tokenizer_lock=rt.tokenizer_lock,
    )


RunnerDep = Annotated[JobRunner, Depends(get_runner)]


JobName = Annotated[str, PathParam(max_length=64, description="the job's id (ft-...)")]


def _not_found() -> ApiError:
    return ApiError(404, "no fine-tune job with this id", "name")


@router.post("", status_code=202, summary="Start a fine-tune job")
async def create_job(body: FineTuneRequest, runner: RunnerDep):
    spec = JobSpec(
        adapter_id=body.adapter_id,
        method=body.method,
        training_data=_jsonl(body.training_data),
        config=body.config,
        target_modules=body.target_modules,
        hyperparameters=body.hyperparameters,
        validation_data=_jsonl(body.validation_data),
    )
    try:
        return await asyncio.to_thread(runner.submit, spec)
    except JobInvalid as e:
        raise ApiError(422, e.message, f"body.{e.where}") from None


@router.get("", summary="List fine-tune jobs, newest first")
async def list_jobs(
    runner: RunnerDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
):
    jobs, total = await asyncio.to_thread(runner.list, offset, limit)
    return {"jobs": jobs, "total": total, "offset": offset, "limit": limit}


@router.get("/{name}", summary="One fine-tune job")
async def get_job(name: JobName, runner: RunnerDep):
    try:
        return await asyncio.to_thread(runner.get, name)
    except JobNotFound:
        raise _not_found() from None


@router.get("/{name}/events", summary="Events of a fine-tune job")
async def job_events(
    name: JobName,
    runner: RunnerDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
):
    try:
        events = await asyncio.to_thread(runner.events, name, after, limit)
    except JobNotFound:
        raise _not_found() from None
    return {"events": events}


@router.post("/{name}/cancel", summary="Cancel a queued or running fine-tune job")
async def cancel_job(name: JobName, runner: RunnerDep):
    try:
        return await asyncio.to_thread(runner.cancel, name)
    except JobNotFound:
        raise _not_found() from None
    except JobConflict as e:
        raise ApiError(409, str(e), "name") from None
