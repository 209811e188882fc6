"""``/generate`` streaming: the Server-Sent Events parser and the stream objects it feeds."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from .errors import FacetError, from_body
from .models import Generation, Token


class SSEParser:
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


def stream_item(event: str | None, data: str) -> Token | Generation:
    """A ``token`` event as a ``Token``, ``done`` as the ``Generation``; ``error`` raises."""
    payload = json.loads(data)
    if event == "token":
        return Token(payload["token_id"], payload.get("text", ""), payload.get("logprob"))
    if event == "done":
        return Generation.from_json(payload)
    if event == "error":
        raise from_body(500, payload)
    raise FacetError(0, "protocol_error", f"unexpected server-sent event {event!r}")


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
