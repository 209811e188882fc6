"""``/fine-tunes``: train an adapter on the resident model in the background. Admin scope.

    POST /fine-tunes                 202 + the job (queued); 422 before any work if anything is invalid
    GET  /fine-tunes                 jobs, newest first (paginated)
    GET  /fine-tunes/{name}          one job (status, step, loss, result or error)
    GET  /fine-tunes/{name}/events   its events (created, started, step, eval, checkpoint, ...); ?after=seq
                                     with Accept: text/event-stream (or ?stream=true): Server-Sent
                                     Events that follow the job until its terminal event
    GET  /fine-tunes/{name}/loss.png the train (blue) and validation (orange) loss curves
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
import math
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from server.jobs.runner import TERMINAL, JobConflict, JobInvalid, JobNotFound, JobRunner, JobSpec

from .deps import AdminScope, ReadyRuntime
from .errors import ApiError
from .inference import EventStream, sse
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
            if rt.metrics is not None:  # job metrics are read from it at scrape time
                rt.metrics.fine_tunes = runner
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


STREAM_POLL_S = 0.2
STREAM_KEEPALIVE_S = 15.0

_EVENTS_DOC = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON `{events}`; with `Accept: text/event-stream` or `?stream=true`: one SSE"
        " event per job event (`id` = seq, `event` = type), ending after the terminal event",
    }
}


@router.get("/{name}/events", summary="Events of a fine-tune job", responses=_EVENTS_DOC)
async def job_events(
    name: JobName,
    request: Request,
    runner: RunnerDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
):
    try:
        events = await asyncio.to_thread(runner.events, name, after, limit)
    except JobNotFound:
        raise _not_found() from None
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        return EventStream(follow_events(runner, name, after, events), on_close=lambda: None)
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
    "/{name}/loss.png",
    summary="Loss curve of a fine-tune job (PNG)",
    responses={200: {"content": {"image/png": {}}, "description": "train (blue), validation (orange)"}},
    response_class=Response,
)
async def job_loss_png(name: JobName, runner: RunnerDep):
    try:
        train, val = await asyncio.to_thread(runner.loss_curve, name)
    except JobNotFound:
        raise _not_found() from None
    png = await asyncio.to_thread(plot_png, [(train, TRAIN_COLOR), (val, VAL_COLOR)])
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})


# ---- a tiny line-plot rasteriser and PNG encoder (no plotting dependency) ----------------------
TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (255, 127, 14)
_AXIS_COLOR = (0, 0, 0)
_GRID_COLOR = (225, 225, 225)
_BACKGROUND = (255, 255, 255)


class Canvas:
    """RGB pixels, row-major, origin top-left."""

    def __init__(self, width: int, height: int, color=_BACKGROUND):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(color) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i : i + 3])

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, width: int = 1) -> None:
        """Bresenham; ``width`` > 1 draws a square brush."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        lo, hi = -((width - 1) // 2), width // 2
        while True:
            if width == 1:
                self.set(x0, y0, color)
            else:
                self.rect(x0 + lo, y0 + lo, x0 + hi, y0 + hi, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def png(self) -> bytes:
        row = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * row : (y + 1) * row]) for y in range(self.height))
        return encode_png(self.width, self.height, raw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, raw: bytes) -> bytes:
    """8-bit RGB PNG from filtered scanlines (each row: filter byte 0 + ``3 * width`` bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def plot_png(
    series: Sequence[tuple[Sequence[tuple[float, float]], tuple[int, int, int]]],
    width: int = 640,
    height: int = 360,
) -> bytes:
    """Line plot of ``(points, color)`` series on shared axes (x: step, y: loss), light grid;
    no text. Empty (or all non-finite) series give empty axes."""
    left, right, top, bottom = 40, 16, 16, 32
    x_lo, x_hi, y_lo, y_hi = left, width - 1 - right, top, height - 1 - bottom
    canvas = Canvas(width, height)
    for i in range(1, 5):  # grid
        y = y_lo + (y_hi - y_lo) * i // 5
        canvas.line(x_lo, y, x_hi, y, _GRID_COLOR)
        x = x_lo + (x_hi - x_lo) * i // 5
        canvas.line(x, y_lo, x, y_hi, _GRID_COLOR)
    points = [
        [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for pts, _ in series
    ]
    every = [p for pts in points for p in pts]
    if every:
        xmin, xmax = min(x for x, _ in every), max(x for x, _ in every)
        ymin, ymax = min(y for _, y in every), max(y for _, y in every)
        if xmax == xmin:
            xmin, xmax = xmin - 1, xmax + 1
        pad = (ymax - ymin) * 0.05 or max(abs(ymax) * 0.05, 0.5)
        ymin, ymax = ymin - pad, ymax + pad

        def px(x: float, y: float) -> tuple[int, int]:
            return (
                round(x_lo + (x - xmin) / (xmax - xmin) * (x_hi - x_lo)),
                round(y_hi - (y - ymin) / (ymax - ymin) * (y_hi - y_lo)),
            )

        for pts, (_, color) in zip(points, series, strict=True):
            coords = [px(x, y) for x, y in pts]
            for (a, b), (c, d) in zip(coords, coords[1:], strict=False):
                canvas.line(a, b, c, d, color, width=2)
            if len(coords) == 1:
                canvas.rect(coords[0][0] - 2, coords[0][1] - 2, coords[0][0] + 2, coords[0][1] + 2, color)
    canvas.line(x_lo, y_lo, x_lo, y_hi, _AXIS_COLOR, width=2)  # axes over the curves' edges
    canvas.line(x_lo, y_hi, x_hi, y_hi, _AXIS_COLOR, width=2)
    for i in range(6):  # ticks
        x = x_lo + (x_hi - x_lo) * i // 5
        canvas.line(x, y_hi, x, y_hi + 5, _AXIS_COLOR)
        y = y_lo + (y_hi - y_lo) * i // 5
        canvas.line(x_lo - 5, y, x_lo, y, _AXIS_COLOR)
    for i, (_, color) in enumerate(series):  # legend: a swatch per series that has points
        if points[i]:
            canvas.rect(x_hi - 14 - 20 * i, y_lo + 4, x_hi - 4 - 20 * i, y_lo + 14, color)
    return canvas.png()


@router.post("/{name}/cancel", summary="Cancel a queued or running fine-tune job")
async def cancel_job(name: JobName, runner: RunnerDep):
    try:
        return await asyncio.to_thread(runner.cancel, name)
    except JobNotFound:
        raise _not_found() from None
    except JobConflict as e:
        raise ApiError(409, str(e), "name") from None
