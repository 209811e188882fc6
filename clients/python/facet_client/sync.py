"""``Client``: the blocking client and its resources (``adapters``, ``files``, ``fine_tunes``).

Every method's request and parsing is in ``_ops`` (shared with ``AsyncClient``); this file only
sends them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from . import _ops as ops
from ._ops import DEFAULT_URL, FileSource, Progress
from ._sse import GenerationStream, SSEParser, stream_item
from .errors import FineTuneTimeout, from_response
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


class _Resource:
    def __init__(self, client: Client):
        self._client = client
        self._run = client._run


class Adapters(_Resource):
    """``client.adapters``: upload / list / get / delete (admin scope)."""

    def upload(
        self, folder: str | os.PathLike, adapter_id: str | None = None, progress: Progress | None = None
    ) -> Adapter:
        """Upload ``folder`` (``adapter_config.json`` + ``adapter_model.safetensors``) as
        ``adapter_id`` (default: the folder's name); a new version if the id exists.
        ``progress(n)`` is called as each ``n`` bytes are sent (e.g. a tqdm's ``update``)."""
        return self._run(ops.adapter_upload(folder, adapter_id, progress))

    def list(self, offset: int = 0, limit: int = 50) -> AdapterPage:
        return self._run(ops.adapter_list(offset, limit))

    def get(self, adapter_id: str) -> Adapter:
        return self._run(ops.adapter_get(adapter_id))

    def delete(self, adapter_id: str) -> Adapter:
        return self._run(ops.adapter_delete(adapter_id))


class Files(_Resource):
    """``client.files``: JSONL training files on the server (``/files``, admin scope)."""

    def create(
        self,
        file: FileSource | bytes,
        purpose: str = "fine-tune",
        filename: str | None = None,
        progress: Progress | None = None,
    ) -> TrainingFile:
        """Upload a local JSONL file (a path) or JSONL ``bytes`` (named ``filename``, default the
        path's name). The server checks every line: ``ValidationError`` names the first bad one;
        ``BadRequestError`` (413) above its ``max_file_bytes``."""
        return self._run(ops.file_create(file, purpose, filename, progress))

    def list(self) -> list[TrainingFile]:
        """Every file, newest first."""
        return self._run(ops.file_list())

    def get(self, file_id: str) -> TrainingFile:
        return self._run(ops.file_get(file_id))

    def content(self, file_id: str) -> str:
        """The JSONL as uploaded."""
        return self._run(ops.file_content(file_id))

    def delete(self, file_id: str) -> DeletedFile:
        """Jobs already created from it keep their own copy of the data."""
        return self._run(ops.file_delete(file_id))


class FineTunes(_Resource):
    """``client.fine_tunes``: create / list / get / events / watch / wait / cancel (admin scope)."""

    def create(
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
        """Queue a job training ``method`` (lora, hut, ...) into ``adapter_id``.

        Data: ``training_data`` inline (JSONL text or a list of ``{"prompt", "completion"}`` /
        ``{"messages"}`` records; the request is capped at the server's ``max_body_bytes``) or
        ``training_file``: a file id from ``files.create`` (``"file-..."``) or a local JSONL path,
        uploaded first through ``/files`` (it stays there; see ``files``). The same for validation.
        """
        return self._run(
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

    def list(self, offset: int = 0, limit: int = 50) -> FineTunePage:
        return self._run(ops.fine_tune_list(offset, limit))

    def get(self, job_id: str) -> FineTune:
        return self._run(ops.fine_tune_get(job_id))

    def events(self, job_id: str, after: int | None = None) -> list[FineTuneEvent]:
        return self._run(ops.fine_tune_events(job_id, after))

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
                return ops.final(job)
            if deadline is not None and time.monotonic() >= deadline:
                raise FineTuneTimeout(job, timeout)
            time.sleep(ops.poll_delay(poll_interval, deadline, time.monotonic()))

    def cancel(self, job_id: str) -> FineTune:
        return self._run(ops.fine_tune_cancel(job_id))


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
            base_url=base_url.rstrip("/"), headers=ops.headers(api_key), timeout=timeout, transport=transport
        )
        self.adapters = Adapters(self)
        self.files = Files(self)
        self.fine_tunes = FineTunes(self)

    def _send(self, call: ops.Call) -> Any:
        try:
            response = self._http.request(call.method, call.path, **call.kwargs)
        except httpx.TransportError as exc:
            raise ops.connection_error(exc) from exc
        return call.parse(ops.check(response))

    def _run(self, op: ops.Call | ops.Steps) -> Any:
        return ops.drive(op, self._send)

    def health(self) -> dict:
        return self._run(ops.health())

    def ready(self) -> dict:
        return self._run(ops.ready())

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> Generation:
        """``options``: max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs."""
        return self._run(ops.generate(ops.generate_body(prompt, messages, adapter, False, options)))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str | None = None,
        **options: Any,
    ) -> GenerationStream:
        body = ops.generate_body(prompt, messages, adapter, True, options)
        return GenerationStream(self._events(body))

    def _events(self, body: dict) -> Iterator[Token | Generation]:
        try:
            with self._http.stream("POST", "/generate", json=body) as response:
                if response.is_error:
                    response.read()
                    raise from_response(response)
                parser = SSEParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield stream_item(*event)
                event = parser.feed("")  # a last event without its blank line
                if event is not None:
                    yield stream_item(*event)
        except httpx.TransportError as exc:
            raise ops.connection_error(exc) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
