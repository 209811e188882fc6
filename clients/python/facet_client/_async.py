"""``AsyncClient``: the ``Client`` API with ``await`` / ``async for`` (same ``_ops``, async I/O)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from . import _ops as ops
from ._ops import DEFAULT_URL, FileSource, Progress
from ._sse import AsyncGenerationStream, SSEParser, stream_item
from .errors import FacetError, FineTuneTimeout, from_response
from .models import (
    Adapter,
    AdapterPage,
    DeletedFile,
    FineTune,
    FineTuneEvent,
    FineTunePage,
    Generation,
    Token,
    TrainingFile,
)


class _AsyncResource:
    def __init__(self, client: AsyncClient):
        self._client = client
        self._run = client._run


class AsyncAdapters(_AsyncResource):
    """``AsyncClient.adapters``: the ``Adapters`` API with ``await``."""

    async def upload(
        self, folder: str | os.PathLike, adapter_id: str | None = None, progress: Progress | None = None
    ) -> Adapter:
        return await self._run(ops.adapter_upload(folder, adapter_id, progress))

    async def list(self, offset: int = 0, limit: int = 50) -> AdapterPage:
        return await self._run(ops.adapter_list(offset, limit))

    async def get(self, adapter_id: str) -> Adapter:
        return await self._run(ops.adapter_get(adapter_id))

    async def delete(self, adapter_id: str) -> Adapter:
        return await self._run(ops.adapter_delete(adapter_id))


class AsyncFiles(_AsyncResource):
    """``AsyncClient.files``: the ``Files`` API with ``await``."""

    async def create(
        self,
        file: FileSource | bytes,
        purpose: str = "fine-tune",
        filename: str | None = None,
        progress: Progress | None = None,
    ) -> TrainingFile:
        return await self._run(ops.file_create(file, purpose, filename, progress))

    async def list(self) -> list[TrainingFile]:
        return await self._run(ops.file_list())

    async def get(self, file_id: str) -> TrainingFile:
        return await self._run(ops.file_get(file_id))

    async def content(self, file_id: str) -> str:
        return await self._run(ops.file_content(file_id))

    async def delete(self, file_id: str) -> DeletedFile:
        return await self._run(ops.file_delete(file_id))


class AsyncFineTunes(_AsyncResource):
    """``AsyncClient.fine_tunes``: the ``FineTunes`` API with ``await`` / ``async for``."""

    async def create(
        self,
        adapter_id: str,
        method: str,
        method_config: dict | None = None,
        target_modules: list[str] | str | None = None,
        training_data: str | list[dict] | None = None,
        training_file: FileSource | None = None,
        validation_data: str | list[dict] | None = None,
        hyperparameters: dict | None = None,
        *,
        validation_file: FileSource | None = None,
    ) -> FineTune:
        return await self._run(
            ops.fine_tune_create(
                adapter_id,
                method,
                method_config,
                target_modules,
                training_data,
                training_file,
                validation_data,
                validation_file,
                hyperparameters,
            )  # fmt: skip
        )

    async def list(self, offset: int = 0, limit: int = 50) -> FineTunePage:
        return await self._run(ops.fine_tune_list(offset, limit))

    async def get(self, job_id: str) -> FineTune:
        return await self._run(ops.fine_tune_get(job_id))

    async def events(self, job_id: str, after: int | None = None) -> list[FineTuneEvent]:
        return await self._run(ops.fine_tune_events(job_id, after))

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
                return ops.final(job)
            if deadline is not None and loop.time() >= deadline:
                raise FineTuneTimeout(job, timeout)
            await asyncio.sleep(ops.poll_delay(poll_interval, deadline, loop.time()))

    async def cancel(self, job_id: str) -> FineTune:
        return await self._run(ops.fine_tune_cancel(job_id))


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
            base_url=base_url.rstrip("/"), headers=ops.headers(api_key), timeout=timeout, transport=transport
        )
        self.adapters = AsyncAdapters(self)
        self.files = AsyncFiles(self)
        self.fine_tunes = AsyncFineTunes(self)

    async def _send(self, call: ops.Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **call.kwargs)
        except httpx.TransportError as exc:
            raise ops.connection_error(exc) from exc
        return call.parse(ops.check(response))

    async def _run(self, op: ops.Call | ops.Steps) -> Any:
        """``ops.drive`` with ``await``."""
        if isinstance(op, ops.Call):
            return await self._send(op)
        try:
            call = next(op)
            while True:
                try:
                    result = await self._send(call)
                except FacetError as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(result)
        except StopIteration as stop:
            return stop.value

    async def health(self) -> dict:
        return await self._run(ops.health())

    async def ready(self) -> dict:
        return await self._run(ops.ready())

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> Generation:
        return await self._run(ops.generate(ops.generate_body(prompt, messages, adapter, False, options)))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> AsyncGenerationStream:
        body = ops.generate_body(prompt, messages, adapter, True, options)
        return AsyncGenerationStream(self._events(body))

    async def _events(self, body: dict) -> AsyncIterator[Token | Generation]:
        try:
            async with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    await response.aread()
                    raise from_response(response)
                parser = SSEParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield stream_item(*event)
                event = parser.feed("")
                if event is not None:
                    yield stream_item(*event)
        except httpx.TransportError as exc:
            raise ops.connection_error(exc) from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
