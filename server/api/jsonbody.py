"""Strict decoding of JSON request bodies, once, for every route that takes one (``JSONRoute``).

FastAPI's own decoding (``json.loads`` of the bytes) lets through what later breaks a request or
silently changes its meaning, and it runs before the route's scope check:

* duplicate keys (``{"prompt": "a", "prompt": "b"}``: the last one won) -> 422 naming the key;
* ``NaN`` / ``Infinity`` (not JSON), ``1e999`` and integers too long to convert -> 422;
* lone surrogates (``"\\ud800"``: a ``str`` that cannot be UTF-8 encoded, so the tokenizer or the
  JSON answer fails with a 500 later) -> 422 naming the field path, e.g. ``body.messages.0.content``;
* a body that is not UTF-8 -> 400; a Content-Type that is not JSON -> 415 (FastAPI: a vague 422).

``JSONRoute`` runs the route's scope checks (``deps.require_scope``) first, so a key without the
scope gets its 403 before a byte of the body is read, then checks the Content-Type, decodes the
body and hands the result to FastAPI's own handler, which validates it without parsing it again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from adapters_store.safetensors_header import DuplicateKey, lone_surrogate_at, strict_json_loads

from .errors import ApiError

_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a JSON text can spell one
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.ASCII)
_MAX_WHERE_PART = 64


def _shown(part: object) -> str:
    text = str(part)
    return text if len(text) <= _MAX_WHERE_PART else text[:_MAX_WHERE_PART] + "..."


def check_content_type(header: str | None) -> None:
    """415 unless the Content-Type is JSON (``application/json``, ``application/*+json``), UTF-8."""
    kind, _, rest = (header or "").partition(";")
    if not _JSON_TYPE.fullmatch(kind.strip().lower()):
        shown = "none" if not header else repr(kind.strip()[:64])
        raise ApiError(415, f"expected Content-Type: application/json (got {shown})", "header.Content-Type")
    for param in rest.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, "JSON bodies must be UTF-8 (charset=utf-8)", "header.Content-Type")


def decode_json_body(raw: bytes) -> Any:
    """The body's JSON value, or ``ApiError`` (400 not UTF-8; 422 not strict JSON, naming the
    duplicate key or the field path of a lone surrogate)."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text (byte {e.start})", "body") from None
    try:
        value = strict_json_loads(text)  # the store's parser for adapter_config.json, too
    except json.JSONDecodeError as e:
        raise ApiError(
            422, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", "body"
        ) from None
    except DuplicateKey as e:
        raise ApiError(422, f"duplicate key {_shown(e.key)!r} in a JSON object", "body") from None
    except RecursionError:
        raise ApiError(422, "request body nests too deeply", "body") from None
    except ValueError as e:  # NaN / Infinity, 1e999, an integer of more digits than Python converts
        raise ApiError(422, f"request body is not valid JSON ({str(e)[:100]})", "body") from None
    if _MAYBE_SURROGATE.search(text) and (found := lone_surrogate_at(value)) is not None:
        path, is_key = found
        where = ".".join(["body", *(_shown(p) for p in path)])
        what = "an object key here" if is_key else "this text"
        message = f"{what} is not valid Unicode: a lone surrogate (\\ud800-\\udfff) cannot be UTF-8 encoded"
        raise ApiError(422, message, where)
    return value


class _DecodedRequest(Request):
    """A request whose ``json()`` is the value ``JSONRoute`` already decoded."""

    decoded: Any = None

    async def json(self) -> Any:
        return self.decoded


def _scope_checks(route: APIRoute) -> list[Callable[[Request], None]]:
    return [d.dependency for d in route.dependencies if getattr(d.dependency, "api_scope", None)]


class JSONRoute(APIRoute):
    """``APIRouter(route_class=JSONRoute)``: routes with a JSON body decode it with
    ``decode_json_body`` after their scope checks; other routes are unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, params.Form):
            return handler
        checks = _scope_checks(self)

        async def decode_then_handle(request: Request) -> Response:
            for check in checks:  # 403 before the body is read (they run again as dependencies)
                check(request)
            check_content_type(request.headers.get("content-type"))
            request = _DecodedRequest(request.scope, request.receive)
            raw = await request.body()
            if raw:  # empty: FastAPI answers "field required"
                request.decoded = decode_json_body(raw)
            return await handler(request)

        return decode_then_handle
