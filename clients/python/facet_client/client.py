"""``Client`` (blocking) and ``AsyncClient`` for Facet's native API (``/generate``, ``/adapters``).

Both share the request building and response parsing below; only the I/O differs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .errors import (
    FacetConnectionError,
    FacetError,
    FineTuneError,
    FineTuneTimeout,
    from_body,
    from_response,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


# ----------------------------------------------------------------------------------- results


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None
    adapter_version: int | None = None
    logprobs: list[dict] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_json(cls, body: dict) -> Generation:
        usage = body.get("usage") or {}
        return cls(
            text=body["text"],
            finish_reason=body["finish_reason"],
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            adapter=body.get("adapter"),
            adapter_version=body.get("adapter_version"),
            logprobs=body.get("logprobs"),
            raw=body,
        )


@dataclass
class Token:
    """One streamed token (``text`` may be empty while a character is incomplete)."""

    token_id: int
    text: str
    logprob: float | None = None


@dataclass
class Adapter:
    adapter_id: str
    version: int
    family: str
    status: str
    nbytes: int
    residency: list[str]
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict) -> Adapter:
        return cls(
            adapter_id=body["adapter_id"],
            version=body["version"],
            family=body["family"],
            status=body["status"],
            nbytes=body["nbytes"],
            residency=list(body.get("residency", [])),
            raw=body,
        )


@dataclass
class AdapterPage:
    adapters: list[Adapter]
    total: int
    offset: int
    limit: int


@dataclass
class FineTune:
    """A fine-tune job (``/fine-tunes``): ``status`` is queued, running, succeeded, failed or cancelled."""

    id: str
    adapter_id: str
    method: str
    status: str
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    error: str | None = None
    result: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, body: dict) -> FineTune:
        return cls(
            id=body["id"],
            adapter_id=body["adapter_id"],
            method=body["method"],
            status=body["status"],
            step=body.get("step") or 0,
            total_steps=body.get("total_steps"),
            loss=body.get("loss"),
            error=body.get("error"),
            result=body.get("result"),
            raw=body,
        )


@dataclass
class FineTuneEvent:
    """One job event: ``type`` is created, started, step, eval, checkpoint, cancel_requested or a
    terminal status; ``data`` its payload (a step's has step, total_steps, loss, ...)."""

    seq: int
    time: float
    type: str
    data: dict

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @classmethod
    def from_json(cls, body: dict) -> FineTuneEvent:
        return cls(body["seq"], body["time"], body["type"], body.get("data") or {})


@dataclass
class FineTunePage:
    jobs: list[FineTune]
    total: int
    offset: int
    limit: int


# -------------------------------------------------------------------------------- shared parts


def _read_data(data: str | list | None, file: str | os.PathLike | None, name: str) -> str | list | None:
    if data is not None and file is not None:
        raise ValueError(f"give at most one of {name}_data and {name}_file")
    if file is not None:
        return Path(file).read_text(encoding="utf-8")
    return data


def _fine_tune_body(
    adapter_id: str,
    method: str,
    method_config: dict | None,
    target_modules: list[str] | str | None,
    training_data: str | list | None,
    training_file: str | os.PathLike | None,
    validation_data: str | list | None,
    validation_file: str | os.PathLike | None,
    hyperparameters: dict | None,
) -> dict:
    train = _read_data(training_data, training_file, "training")
    if train is None:
        raise ValueError("give training_data (JSONL text or a list of records) or training_file")
    body: dict[str, Any] = {"adapter_id": adapter_id, "method": method, "training_data": train}
    if method_config:
        body["config"] = method_config
    if target_modules is not None:
        body["target_modules"] = target_modules
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    val = _read_data(validation_data, validation_file, "validation")
    if val is not None:
        body["validation_data"] = val
    return body


def _final(job: FineTune) -> FineTune:
    if job.status == "failed":
        raise FineTuneError(job, f"fine-tune {job.id} failed: {job.error or 'no error given'}")
    if job.status == "cancelled":
        raise FineTuneError(job, f"fine-tune {job.id} was cancelled at step {job.step}")
    return job


def _generate_body(
    prompt: str | None,
    messages: list[dict] | None,
    adapter: str | None,
    stream: bool,
    options: dict[str, Any],
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


class _ProgressBytes(io.BytesIO):
    """Bytes whose reads (as httpx streams the multipart body) are reported to ``progress(n)``."""

    def __init__(self, data: bytes, progress: Callable[[int], object]):
        super().__init__(data)
        self._progress = progress

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if chunk:
            self._progress(len(chunk))
        return chunk


def _upload_parts(
    folder: str | os.PathLike, adapter_id: str | None, progress: Callable[[int], object] | None = None
) -> tuple[dict, dict]:
    folder = Path(folder)
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    data = {"adapter_id": adapter_id or folder.resolve().name}
    config_bytes, weights_bytes = config.read_bytes(), weights.read_bytes()
    if progress is not None:
        total = getattr(progress, "__self__", None)  # a tqdm's bound update: give it the total
        if total is not None and getattr(total, "total", 0) is None:
            total.total = len(config_bytes) + len(weights_bytes)
        config_bytes = _ProgressBytes(config_bytes, progress)
        weights_bytes = _ProgressBytes(weights_bytes, progress)
    files = {
        "config": (CONFIG_NAME, config_bytes, "application/json"),
        "weights": (WEIGHTS_NAME, weights_bytes, "application/octet-stream"),
    }
    return data, files


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _SSE:
    """Incremental ``text/event-stream`` parser: feed lines, get (event, data) at blank lines."""

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str] | None:
        if line == "":
            if not self.data:
                self.event = None
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = None, []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def _stream_item(event: str | None, data: str) -> Token | Generation:
    payload = json.loads(data)
    if event == "token":
        return Token(payload["token_id"], payload.get("text", ""), payload.get("logprob"))
    if event == "done":
        return Generation.from_json(payload)
    if event == "error":
        raise from_body(500, payload)
    raise FacetError(0, "protocol_error", f"unexpected server-sent event {event!r}")


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise from_response(response)
    return response


# ------------------------------------------------------------------------------------ streams


class GenerationStream:
    """Iterate for ``Token``s; afterwards ``result`` is the whole ``Generation``."""

    def __init__(self, items: Iterator[Token | Generation]):
        self._items = items
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Token]:
        for item in self._items:
            if isinstance(item, Generation):
                self.result = item
            else:
                yield item

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGenerationStream:
    """``async for`` the ``Token``s; afterwards ``result`` is the whole ``Generation``."""

    def __init__(self, items: AsyncIterator[Token | Generation]):
        self._items = items
        self.result: Generation | None = None

    async def __aiter__(self) -> AsyncIterator[Token]:
        async for item in self._items:
            if isinstance(item, Generation):
                self.result = item
            else:
                yield item

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# ---------------------------------------------------------------------------------- sync client


class Adapters:
    """``client.adapters``: upload / list / get / delete (admin scope)."""

    def __init__(self, client: Client):
        self._client = client

    def upload(
        self,
        folder: str | os.PathLike,
        adapter_id: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> Adapter:
        """Upload ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``) as
        ``adapter_id`` (default: the folder's name); a new version if the id exists.
        ``progress(n)`` is called as each ``n`` bytes are sent (e.g. a tqdm's ``update``)."""
        data, files = _upload_parts(folder, adapter_id, progress)
        return Adapter.from_json(self._client._request("POST", "/adapters", data=data, files=files).json())

    def list(self, offset: int = 0, limit: int = 50) -> AdapterPage:
        body = self._client._request("GET", "/adapters", params={"offset": offset, "limit": limit}).json()
        return AdapterPage([Adapter.from_json(a) for a in body["adapters"]], body["total"], offset, limit)

    def get(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(self._client._request("GET", f"/adapters/{adapter_id}").json())

    def delete(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(self._client._request("DELETE", f"/adapters/{adapter_id}").json())


class FineTunes:
    """``client.fine_tunes``: create / list / get / events / watch / wait / cancel (admin scope)."""

    def __init__(self, client: Client):
        self._client = client

    def create(
        self,
        adapter_id: str,
        method: str,
        method_config: dict | None = None,
        target_modules: list[str] | str | None = None,
        training_data: str | list[dict] | None = None,
        training_file: str | os.PathLike | None = None,
        validation_data: str | list[dict] | None = None,
        hyperparameters: dict | None = None,
        *,
        validation_file: str | os.PathLike | None = None,
    ) -> FineTune:
        """Queue a job training ``method`` (lora, hut, ...) into ``adapter_id``. Data is JSONL text, a
        list of ``{"prompt", "completion"}`` / ``{"messages"}`` records, or a JSONL file."""
        body = _fine_tune_body(
            adapter_id, method, method_config, target_modules, training_data, training_file,
            validation_data, validation_file, hyperparameters,
        )  # fmt: skip
        return FineTune.from_json(self._client._request("POST", "/fine-tunes", json=body).json())

    def list(self, offset: int = 0, limit: int = 50) -> FineTunePage:
        params = {"offset": offset, "limit": limit}
        body = self._client._request("GET", "/fine-tunes", params=params).json()
        return FineTunePage([FineTune.from_json(j) for j in body["jobs"]], body["total"], offset, limit)

    def get(self, job_id: str) -> FineTune:
        return FineTune.from_json(self._client._request("GET", f"/fine-tunes/{job_id}").json())

    def events(self, job_id: str, after: int | None = None) -> list[FineTuneEvent]:
        params = {"after": after} if after is not None else {}
        body = self._client._request("GET", f"/fine-tunes/{job_id}/events", params=params).json()
        return [FineTuneEvent.from_json(e) for e in body["events"]]

    def watch(
        self, job_id: str, poll_interval: float = 0.5, after: int | None = None
    ) -> Iterator[FineTuneEvent]:
        """Yield the job's events as they come, until (and including) its terminal one."""
        while True:
            events = self.events(job_id, after)
            for event in events:
                after = event.seq
                yield event
                if event.terminal:
                    return
            if not events:
                time.sleep(poll_interval)

    def wait(self, job_id: str, timeout: float | None = None, poll_interval: float = 0.5) -> FineTune:
        """The finished job; ``FineTuneError`` if it failed or was cancelled (with the server's
        error), ``FineTuneTimeout`` if still unfinished after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.done:
                return _final(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise FineTuneTimeout(job, timeout)
            time.sleep(
                poll_interval
                if deadline is None
                else min(poll_interval, max(0.0, deadline - time.monotonic()))
            )

    def cancel(self, job_id: str) -> FineTune:
        return FineTune.from_json(self._client._request("POST", f"/fine-tunes/{job_id}/cancel").json())


class Client:
    """Blocking client. ``Client(url, api_key=...)``; use as a context manager or ``close()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout, transport=transport
        )
        self.adapters = Adapters(self)
        self.fine_tunes = FineTunes(self)

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise FacetConnectionError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc
        return _check(response)

    def health(self) -> dict:
        return self._request("GET", "/health").json()

    def ready(self) -> dict:
        return self._request("GET", "/ready").json()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> Generation:
        """``options``: max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs."""
        body = _generate_body(prompt, messages, adapter, False, options)
        return Generation.from_json(self._request("POST", "/generate", json=body).json())

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> GenerationStream:
        body = _generate_body(prompt, messages, adapter, True, options)
        return GenerationStream(self._events(body))

    def _events(self, body: dict) -> Iterator[Token | Generation]:
        try:
            with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    response.read()
                    raise from_response(response)
                parser = _SSE()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield _stream_item(*event)
                event = parser.feed("")  # a last event without its blank line
                if event is not None:
                    yield _stream_item(*event)
        except httpx.TransportError as exc:
            raise FacetConnectionError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------- async client


class AsyncAdapters:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def upload(self, folder: str | os.PathLike, adapter_id: str | None = None) -> Adapter:
        data, files = _upload_parts(folder, adapter_id)
        response = await self._client._request("POST", "/adapters", data=data, files=files)
        return Adapter.from_json(response.json())

    async def list(self, offset: int = 0, limit: int = 50) -> AdapterPage:
        response = await self._client._request("GET", "/adapters", params={"offset": offset, "limit": limit})
        body = response.json()
        return AdapterPage([Adapter.from_json(a) for a in body["adapters"]], body["total"], offset, limit)

    async def get(self, adapter_id: str) -> Adapter:
        return Adapter.from_json((await self._client._request("GET", f"/adapters/{adapter_id}")).json())

    async def delete(self, adapter_id: str) -> Adapter:
        return Adapter.from_json((await self._client._request("DELETE", f"/adapters/{adapter_id}")).json())


class AsyncFineTunes:
    """``AsyncClient.fine_tunes``: the ``FineTunes`` API with ``await`` / ``async for``."""

    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(
        self,
        adapter_id: str,
        method: str,
        method_config: dict | None = None,
        target_modules: list[str] | str | None = None,
        training_data: str | list[dict] | None = None,
        training_file: str | os.PathLike | None = None,
        validation_data: str | list[dict] | None = None,
        hyperparameters: dict | None = None,
        *,
        validation_file: str | os.PathLike | None = None,
    ) -> FineTune:
        body = _fine_tune_body(
            adapter_id, method, method_config, target_modules, training_data, training_file,
            validation_data, validation_file, hyperparameters,
        )  # fmt: skip
        return FineTune.from_json((await self._client._request("POST", "/fine-tunes", json=body)).json())

    async def list(self, offset: int = 0, limit: int = 50) -> FineTunePage:
        params = {"offset": offset, "limit": limit}
        body = (await self._client._request("GET", "/fine-tunes", params=params)).json()
        return FineTunePage([FineTune.from_json(j) for j in body["jobs"]], body["total"], offset, limit)

    async def get(self, job_id: str) -> FineTune:
        return FineTune.from_json((await self._client._request("GET", f"/fine-tunes/{job_id}")).json())

    async def events(self, job_id: str, after: int | None = None) -> list[FineTuneEvent]:
        params = {"after": after} if after is not None else {}
        response = await self._client._request("GET", f"/fine-tunes/{job_id}/events", params=params)
        return [FineTuneEvent.from_json(e) for e in response.json()["events"]]

    async def watch(
        self, job_id: str, poll_interval: float = 0.5, after: int | None = None
    ) -> AsyncIterator[FineTuneEvent]:
        while True:
            events = await self.events(job_id, after)
            for event in events:
                after = event.seq
                yield event
                if event.terminal:
                    return
            if not events:
                await asyncio.sleep(poll_interval)

    async def wait(self, job_id: str, timeout: float | None = None, poll_interval: float = 0.5) -> FineTune:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            job = await self.get(job_id)
            if job.done:
                return _final(job)
            if deadline is not None and loop.time() >= deadline:
                raise FineTuneTimeout(job, timeout)
            await asyncio.sleep(
                poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - loop.time()))
            )

    async def cancel(self, job_id: str) -> FineTune:
        return FineTune.from_json(
            (await self._client._request("POST", f"/fine-tunes/{job_id}/cancel")).json()
        )


class AsyncClient:
    """The ``Client`` API with ``await`` / ``async for``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout, transport=transport
        )
        self.adapters = AsyncAdapters(self)
        self.fine_tunes = AsyncFineTunes(self)

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise FacetConnectionError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc
        return _check(response)

    async def health(self) -> dict:
        return (await self._request("GET", "/health")).json()

    async def ready(self) -> dict:
        return (await self._request("GET", "/ready")).json()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> Generation:
        body = _generate_body(prompt, messages, adapter, False, options)
        return Generation.from_json((await self._request("POST", "/generate", json=body)).json())

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        body = _generate_body(prompt, messages, adapter, True, options)
        return AsyncGenerationStream(self._events(body))

    async def _events(self, body: dict) -> AsyncIterator[Token | Generation]:
        try:
            async with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    await response.aread()
                    raise from_response(response)
                parser = _SSE()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield _stream_item(*event)
                event = parser.feed("")
                if event is not None:
                    yield _stream_item(*event)
        except httpx.TransportError as exc:
            raise FacetConnectionError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
