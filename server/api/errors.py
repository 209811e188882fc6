"""One JSON error shape for every 4xx/5xx: ``{"error": {"type", "message", "where"?}}``.

``where`` names the field or limit at fault (``"body.max_new_tokens"``, ``"weights"``). Messages
never carry paths, stack traces or keys: unexpected exceptions become a generic 500 and are
logged server-side only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapters_store.errors import StoreError

log = logging.getLogger("facet.api")

_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    500: "internal_error",
    503: "not_ready",
    507: "insufficient_storage",
}


class ApiError(Exception):
    """Raise from a route or dependency to answer with the common error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        where: str | None = None,
        *,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.where = where
        self.type = type or _TYPES.get(status, "error")
        self.headers = headers


def _encodable(text: str) -> str:
    """Client text echoed in an error (a key, a tensor name) may hold a lone surrogate, which a
    JSON response cannot encode (a 500 instead of the error): escape it as ``\\ud800``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(type: str, message: str, where: str | None = None) -> dict:
    error = {"type": type, "message": _encodable(message)}
    if where is not None:
        error["where"] = _encodable(where)
    return {"error": error}


def error_response(
    status: int, message: str, where: str | None = None, *, type: str | None = None, headers=None
) -> JSONResponse:
    body = error_body(type or _TYPES.get(status, "error"), message, where)
    return JSONResponse(body, status_code=status, headers=headers)


_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-int"}


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.where, type=exc.type, headers=exc.headers)


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    # The type follows the status, as for every other error; the store's message says the rest
    # (e.g. "...; re-upload the adapter (or delete it)" for a corrupt one).
    return error_response(exc.status, exc.message, exc.where)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return error_response(422, "request body is not valid JSON", "body")
    # Union members show up in the location ("prompt", "str"): keep the field path readable.
    where = _where(tuple(p for p in loc if not (isinstance(p, str) and (p in _TAGS or "[" in p))))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, message, where or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. (Starlette's own 405 names only the methods of
    the first route whose path matched, e.g. ``POST`` for ``/adapters`` where GET works too.)"""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return error_response(exc.status_code, detail, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
