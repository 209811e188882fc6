"""``Client`` (blocking) and ``AsyncClient`` for Facet's native API (``/generate``, ``/adapters``).

Both share the request building and response parsing below; only the I/O differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .errors import FacetConnectionError, FacetError, from_body, from_response

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_URL = "http://127.0.0.1:8000"


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


# -------------------------------------------------------------------------------- shared parts


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


def _upload_parts(folder: str | os.PathLike, adapter_id: str | None) -> tuple[dict, dict]:
    folder = Path(folder)
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    data = {"adapter_id": adapter_id or folder.resolve().name}
    files = {
        "config": (CONFIG_NAME, config.read_bytes(), "application/json"),
        "weights": (WEIGHTS_NAME, weights.read_bytes(), "application/octet-stream"),
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

    def upload(self, folder: str | os.PathLike, adapter_id: str | None = None) -> Adapter:
        """Upload ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``) as
        ``adapter_id`` (default: the folder's name); a new version if the id exists."""
        data, files = _upload_parts(folder, adapter_id)
        return Adapter.from_json(self._client._request("POST", "/adapters", data=data, files=files).json())

    def list(self, offset: int = 0, limit: int = 50) -> AdapterPage:
        body = self._client._request("GET", "/adapters", params={"offset": offset, "limit": limit}).json()
        return AdapterPage([Adapter.from_json(a) for a in body["adapters"]], body["total"], offset, limit)

    def get(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(self._client._request("GET", f"/adapters/{adapter_id}").json())

    def delete(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(self._client._request("DELETE", f"/adapters/{adapter_id}").json())


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
