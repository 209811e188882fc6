"""What every client method sends and how it reads the answer, without doing any I/O.

A method is a ``Call`` (one request and the parser of its response) or, when it takes several
requests (a fine-tune whose local files are uploaded first), a generator of ``Call``s that is
sent each parsed result and returns the method's result. ``Client`` and ``AsyncClient`` only
run them (``drive`` here; its ``await`` twin in ``_async``), so the two cannot drift apart.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .errors import FacetConnectionError, FacetError, FineTuneError, from_response
from .models import (
    Adapter,
    AdapterPage,
    DeletedFile,
    FineTune,
    FineTuneEvent,
    FineTunePage,
    Generation,
    TrainingFile,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_URL = "http://127.0.0.1:8000"
FILE_PREFIX = "file-"

Progress = Callable[[int], object]
FileSource = str | os.PathLike


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    kwargs: dict = field(default_factory=dict)


Steps = Generator[Call, Any, Any]


def _json(response: httpx.Response) -> Any:
    return response.json()


def _seg(value: str) -> str:
    """One path segment (an id): escaped so that it cannot reach another route."""
    return quote(str(value), safe="@")


def check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise from_response(response)
    return response


def connection_error(exc: httpx.TransportError) -> FacetConnectionError:
    return FacetConnectionError(0, "connection_error", f"{type(exc).__name__}: {exc}")


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def drive(op: Call | Steps, send: Callable[[Call], Any]) -> Any:
    """Run ``op`` with ``send(call) -> parsed result`` (errors are thrown into the steps)."""
    if isinstance(op, Call):
        return send(op)
    try:
        call = next(op)
        while True:
            try:
                result = send(call)
            except FacetError as exc:
                call = op.throw(exc)
            else:
                call = op.send(result)
    except StopIteration as stop:
        return stop.value


# ------------------------------------------------------------------------------ server, generate


def health() -> Call:
    return Call("GET", "/health", _json)


def ready() -> Call:
    return Call("GET", "/ready", _json)


def generate_body(
    prompt: str | None, messages: list[dict] | None, adapter: str | None, stream: bool, options: dict
) -> dict:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    body: dict[str, Any] = {"prompt": prompt} if prompt is not None else {"messages": messages}
    if adapter is not None:
        body["adapter"] = adapter
    body.update({k: v for k, v in options.items() if v is not None})
    if stream:
        body["stream"] = True
    return body


def generate(body: dict) -> Call:
    return Call("POST", "/generate", lambda r: Generation.from_json(r.json()), {"json": body})


# ------------------------------------------------------------------------------------- uploads


class _ProgressBytes(io.BytesIO):
    """Bytes whose reads (as httpx streams the multipart body) are reported to ``progress(n)``."""

    def __init__(self, data: bytes, progress: Progress):
        super().__init__(data)
        self._progress = progress

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if chunk:
            self._progress(len(chunk))
        return chunk


def _with_progress(parts: list[bytes], progress: Progress | None) -> list[bytes | io.BytesIO]:
    if progress is None:
        return list(parts)
    bar = getattr(progress, "__self__", None)  # a tqdm's bound update: give it the total
    if bar is not None and getattr(bar, "total", 0) is None:
        bar.total = sum(len(p) for p in parts)
    return [_ProgressBytes(p, progress) for p in parts]


def adapter_upload(folder: FileSource, adapter_id: str | None, progress: Progress | None = None) -> Call:
    folder = Path(folder)
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    data = {"adapter_id": adapter_id or folder.resolve().name}
    config_bytes, weights_bytes = _with_progress([config.read_bytes(), weights.read_bytes()], progress)
    files = {
        "config": (CONFIG_NAME, config_bytes, "application/json"),
        "weights": (WEIGHTS_NAME, weights_bytes, "application/octet-stream"),
    }
    return Call("POST", "/adapters", _adapter, {"data": data, "files": files})


# ------------------------------------------------------------------------------------ adapters


def _adapter(response: httpx.Response) -> Adapter:
    return Adapter.from_json(response.json())


def adapter_list(offset: int, limit: int) -> Call:
    def parse(response: httpx.Response) -> AdapterPage:
        body = response.json()
        return AdapterPage([Adapter.from_json(a) for a in body["adapters"]], body["total"], offset, limit)

    return Call("GET", "/adapters", parse, {"params": {"offset": offset, "limit": limit}})


def adapter_get(adapter_id: str) -> Call:
    return Call("GET", f"/adapters/{_seg(adapter_id)}", _adapter)


def adapter_delete(adapter_id: str) -> Call:
    return Call("DELETE", f"/adapters/{_seg(adapter_id)}", _adapter)


# --------------------------------------------------------------------------------------- files


def _file(response: httpx.Response) -> TrainingFile:
    return TrainingFile.from_json(response.json())


def file_create(
    source: FileSource | bytes,
    purpose: str = "fine-tune",
    filename: str | None = None,
    progress: Progress | None = None,
) -> Call:
    """``POST /files`` of a local JSONL file (a path) or of JSONL ``bytes``; read here, at once."""
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), filename or "data.jsonl"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        data, name = path.read_bytes(), filename or path.name
    else:
        raise TypeError(f"expected a path or bytes, not {type(source).__name__}")
    (part,) = _with_progress([data], progress)
    files = {"file": (name, part, "application/jsonl")}
    return Call("POST", "/files", _file, {"data": {"purpose": purpose}, "files": files})


def file_list() -> Call:
    return Call("GET", "/files", lambda r: [TrainingFile.from_json(f) for f in r.json()["data"]])


def file_get(file_id: str) -> Call:
    return Call("GET", f"/files/{_seg(file_id)}", _file)


def file_content(file_id: str) -> Call:
    return Call("GET", f"/files/{_seg(file_id)}/content", lambda r: r.content.decode("utf-8"))


def file_delete(file_id: str) -> Call:
    return Call("DELETE", f"/files/{_seg(file_id)}", lambda r: DeletedFile.from_json(r.json()))


def is_file_id(source: object) -> bool:
    """A server file id: a ``str`` starting with ``file-`` that is not an existing local path."""
    return isinstance(source, str) and source.startswith(FILE_PREFIX) and not os.path.exists(source)


# ---------------------------------------------------------------------------------- fine-tunes


def _fine_tune(response: httpx.Response) -> FineTune:
    return FineTune.from_json(response.json())


def fine_tune_create(
    adapter_id: str,
    method: str,
    method_config: dict | None,
    target_modules: list[str] | str | None,
    training_data: str | list | None,
    training_file: FileSource | None,
    validation_data: str | list | None,
    validation_file: FileSource | None,
    hyperparameters: dict | None,
) -> Steps:
    """``POST /fine-tunes``; a local ``training_file`` / ``validation_file`` is first uploaded
    (``POST /files``, once if both are the same file) and referenced by its new id."""
    if (training_data is None) == (training_file is None):
        raise ValueError(
            "give exactly one of training_data (JSONL text or a list of records) and training_file"
        )
    if validation_data is not None and validation_file is not None:
        raise ValueError("give at most one of validation_data and validation_file")
    body: dict[str, Any] = {"adapter_id": adapter_id, "method": method}
    if method_config:
        body["method_config"] = method_config
    if target_modules is not None:
        body["target_modules"] = target_modules
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    if training_data is not None:
        body["training_data"] = training_data
    if validation_data is not None:
        body["validation_data"] = validation_data

    uploads: dict[Path, tuple[list[str], Call]] = {}  # every local file is read before any request
    for name, source in (("training_file", training_file), ("validation_file", validation_file)):
        if source is None:
            continue
        if is_file_id(source):
            body[name] = source
            continue
        key = Path(source).resolve()
        if key in uploads:
            uploads[key][0].append(name)
        else:
            uploads[key] = ([name], file_create(source))
    for key, (names, call) in uploads.items():
        try:
            uploaded = yield call
        except FacetError as exc:
            raise relabel(exc, f"uploading {' and '.join(names)} {key}") from exc
        body.update(dict.fromkeys(names, uploaded.id))
    return (yield Call("POST", "/fine-tunes", _fine_tune, {"json": body}))


def relabel(exc: FacetError, what: str) -> FacetError:
    """The same error (class, status, type, where) with ``what`` in front of its message."""
    return type(exc)(exc.status, exc.type, f"{what}: {exc.message}", exc.where, retry_after=exc.retry_after)


def fine_tune_list(offset: int, limit: int) -> Call:
    def parse(response: httpx.Response) -> FineTunePage:
        body = response.json()
        return FineTunePage([FineTune.from_json(j) for j in body["jobs"]], body["total"], offset, limit)

    return Call("GET", "/fine-tunes", parse, {"params": {"offset": offset, "limit": limit}})


def fine_tune_get(job_id: str) -> Call:
    return Call("GET", f"/fine-tunes/{_seg(job_id)}", _fine_tune)


def fine_tune_cancel(job_id: str) -> Call:
    return Call("POST", f"/fine-tunes/{_seg(job_id)}/cancel", _fine_tune)


def fine_tune_events(job_id: str, after: int | None) -> Call:
    params = {"after": after} if after is not None else {}
    return Call(
        "GET",
        f"/fine-tunes/{_seg(job_id)}/events",
        lambda r: [FineTuneEvent.from_json(e) for e in r.json()["events"]],
        {"params": params},
    )


def final(job: FineTune) -> FineTune:
    """A finished job as ``wait`` returns it: raises ``FineTuneError`` unless it succeeded."""
    if job.status == "failed":
        raise FineTuneError(job, f"fine-tune {job.id} failed: {job.error or 'no error given'}")
    if job.status == "cancelled":
        raise FineTuneError(job, f"fine-tune {job.id} was cancelled at step {job.step}")
    return job


def poll_delay(poll_interval: float, deadline: float | None, now: float) -> float:
    return poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - now))
