"""Streaming multipart/form-data parsers: ``POST /adapters`` and ``POST /files``.

Parts: text field ``adapter_id``, files ``config`` (adapter_config.json) and ``weights``
(adapter_model.safetensors). The weights part goes straight to a temp file under
``<data_dir>/uploads`` (written from a worker thread, one request chunk at a time); the small
parts are buffered up to their caps. Nothing is ever held beyond a cap: the answer is 413 naming
the part, and the temp file is removed. ``read_form`` buffers every part (small forms only).
A client that stops sending for ``idle_timeout_s`` gets 408 (and its temp file is removed).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .errors import ApiError

MAX_ID_BYTES = 1024
MAX_PARTS = 8


@dataclass
class AdapterUpload:
    adapter_id: str
    config: bytes
    weights: Path  # temp file: call ``discard`` when done

    def discard(self) -> None:
        self.weights.unlink(missing_ok=True)


@dataclass
class _Part:
    name: str = ""
    filename: str = ""
    buffer: bytearray = field(default_factory=bytearray)
    size: int = 0


class _Reader:
    """Callbacks of ``MultipartParser``. File data is queued in ``pending`` and flushed to the temp
    file by the async driver, so the parser itself never blocks on I/O."""

    def __init__(self, caps: dict[str, int], streamed: str | None):
        self.caps = caps
        self.streamed = streamed
        self.parts: dict[str, _Part] = {}
        self.current: _Part | None = None
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.pending: list[bytes] = []
        self.count = 0
        self.ended = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: self.header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.header_value.extend(d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.count += 1
        if self.count > MAX_PARTS:
            raise ApiError(413, f"too many form parts (at most {MAX_PARTS})", "body")
        self.headers = {}
        self.current = None

    def on_header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("latin-1")
        if name not in self.caps:
            raise ApiError(422, f"unexpected form field; expected {_names(self.caps)}", "body")
        if name in self.parts:
            raise ApiError(422, "form field given twice", f"body.{name}")
        filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self.current = self.parts[name] = _Part(name, filename)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        part.size += end - start
        if part.size > self.caps[part.name]:
            raise ApiError(413, f"{part.name} exceeds {self.caps[part.name]} bytes", f"body.{part.name}")
        if part.name == self.streamed:
            self.pending.append(data[start:end])
        else:
            part.buffer.extend(data[start:end])

    def on_end(self) -> None:
        self.ended = True


async def _chunks(request: Request, idle_timeout_s: float | None) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk; 408 when no chunk arrives for ``idle_timeout_s``."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(408, f"the upload stalled: no data for {idle_timeout_s:g} s", "body") from None
        yield chunk


def _write_all(fd: int, chunks: list[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _names(caps: dict[str, int]) -> str:
    *rest, last = caps
    return f"{', '.join(rest)} and {last}" if rest else last


def _boundary(request: Request, caps: dict[str, int]) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(415, f"expected multipart/form-data with {_names(caps)}", "body")
    return boundary


async def _parse_form(
    request: Request,
    boundary: bytes,
    caps: dict[str, int],
    idle_timeout_s: float | None,
    streamed: str | None = None,
    flush=None,
) -> dict[str, _Part]:
    """Parse the body; the ``streamed`` part's data goes to ``await flush(chunks)``, every other
    part is buffered. The parts named in ``caps`` are all required (422 naming the missing one)."""
    reader = _Reader(caps, streamed)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in _chunks(request, idle_timeout_s):
            parser.write(chunk)
            if reader.pending:
                chunks, reader.pending = reader.pending, []
                await flush(chunks)
        parser.finalize()
    except MultipartParseError:
        raise ApiError(400, "malformed multipart body", "body") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away during the upload", "body") from None
    if not reader.ended:
        raise ApiError(400, "incomplete multipart body", "body")
    for required in caps:
        if required not in reader.parts:
            raise ApiError(422, "field required", f"body.{required}")
    return reader.parts


async def read_adapter_upload(
    request: Request,
    uploads_dir: Path,
    max_config: int,
    max_weights: int,
    idle_timeout_s: float | None = None,
) -> AdapterUpload:
    caps = {"adapter_id": MAX_ID_BYTES, "config": max_config, "weights": max_weights}
    boundary = _boundary(request, caps)
    fd, name = await asyncio.to_thread(
        tempfile.mkstemp, prefix="upload-", suffix=".safetensors", dir=uploads_dir
    )
    path = Path(name)
    try:
        try:
            parts = await _parse_form(
                request,
                boundary,
                caps,
                idle_timeout_s,
                streamed="weights",
                flush=lambda chunks: asyncio.to_thread(_write_all, fd, chunks),
            )
        finally:
            os.close(fd)
        try:
            adapter_id = parts["adapter_id"].buffer.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "adapter_id must be UTF-8 text", "body.adapter_id") from None
        return AdapterUpload(adapter_id, bytes(parts["config"].buffer), path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def read_form(
    request: Request, caps: dict[str, int], idle_timeout_s: float | None = None
) -> dict[str, _Part]:
    """Every part of a small multipart form, buffered (each up to its cap; 413 above). The parts
    named in ``caps`` are all required (422 naming the missing one)."""
    return await _parse_form(request, _boundary(request, caps), caps, idle_timeout_s)
