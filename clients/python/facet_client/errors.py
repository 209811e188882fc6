"""Typed errors carrying the server's ``{"error": {"type", "message", "where"?}}`` body."""

from __future__ import annotations

import json

import httpx


class FacetError(Exception):
    """An error answered by the server (``status`` > 0) or met on the way (``status`` == 0)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        where: str | None = None,
        *,
        retry_after: float | None = None,
    ):
        self.status = status
        self.type = type
        self.message = message
        self.where = where
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f" (at {self.where})" if self.where else ""
        head = f"{self.status} {self.type}" if self.status else self.type
        return f"{head}: {self.message}{at}"


class BadRequestError(FacetError):  # 400, 413, 415
    pass


class AuthenticationError(FacetError):  # 401
    pass


class PermissionDeniedError(FacetError):  # 403
    pass


class NotFoundError(FacetError):  # 404
    pass


class ConflictError(FacetError):  # 409
    pass


class ValidationError(FacetError):  # 422
    pass


class OverloadedError(FacetError):  # 429: retry after ``retry_after`` seconds
    pass


class NotReadyError(FacetError):  # 503: loading or shutting down
    pass


class ServerError(FacetError):  # other 5xx
    pass


class FacetConnectionError(FacetError):  # no answer at all (status 0)
    pass


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    415: BadRequestError,
    422: ValidationError,
    429: OverloadedError,
    503: NotReadyError,
}


def error_class(status: int) -> type[FacetError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else FacetError


def from_body(status: int, body: object, retry_after: float | None = None) -> FacetError:
    """The error of a parsed error body (a non-JSON or foreign body still gives a FacetError)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = str(error.get("type") or "error")
        where = error.get("where") if isinstance(error.get("where"), str) else None
        return error_class(status)(status, kind, error["message"], where, retry_after=retry_after)
    text = body if isinstance(body, str) else json.dumps(body)
    return error_class(status)(status, "error", text[:500] or f"HTTP {status}", retry_after=retry_after)


def from_response(response: httpx.Response) -> FacetError:
    """Read the body first (``response.read()`` / ``await response.aread()``) for streams."""
    retry_after = None
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            pass
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return from_body(response.status_code, body, retry_after)


class FineTuneError(FacetError):
    """A fine-tune job ended ``failed`` or ``cancelled``; ``job`` is its last state."""

    def __init__(self, job, message: str):
        self.job = job
        super().__init__(0, f"fine_tune_{job.status}", message)


class FineTuneTimeout(FacetError, TimeoutError):
    """``wait`` gave up before the job reached a terminal state; ``job`` is its last state."""

    def __init__(self, job, timeout: float):
        self.job = job
        super().__init__(0, "timeout", f"job {job.id} still {job.status} after {timeout:g} s")
