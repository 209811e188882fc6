"""The ingress deployment: the public HTTP API, forwarded to engine replicas by adapter.

Every path of ``make serve``'s API is answered by an engine replica's own app (its routes, auth
scopes, validation and error bodies), so the API is the same by construction. The ingress only
chooses the replica:

* ``POST /generate`` (JSON ``adapter``), ``POST /v1/completions`` and ``/v1/chat/completions``
  (JSON ``model``): the adapter's current version is read from the shared store index and
  ``<id>@<version>`` is the multiplex id, so the router keeps an adapter on the replica that
  already holds it, and a new version is a new id. Base-model requests, unknown ids and bodies
  that do not parse go unkeyed (any replica; the replica answers 404/422 itself);
* ``/fine-tunes``, ``/files``: the fixed id ``JOBS_MODEL_ID``, so every job request reaches the one
  replica whose runner trains (its adapters are written to the shared store, servable everywhere);
* everything else (``/adapters`` uploads and deletes, listings, ``/v1/models``): any replica; the
  store is shared, and every replica resolves versions from the index on each request;
* ``/metrics``: every replica's metrics with a ``replica`` label (``metrics_board``).

Keys: with API keys configured, the ingress checks that a request carries a valid one before it
reads the body (the replica checks the route's scope again). A client that disconnects cancels the
replica's call, and with it the generation.
"""

import asyncio
import json
import logging
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from server.api.errors import error_body, error_response
from server.api.middleware import AuthMiddleware, load_api_keys
from server.settings import Settings

from .config import JOBS_MODEL_ID
from .metrics_board import board, merge

log = logging.getLogger("facet.cluster")

ADAPTER_FIELDS = {"/generate": "adapter", "/v1/completions": "model", "/v1/chat/completions": "model"}
JOB_PREFIXES = ("/fine-tunes", "/files")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "te"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class VersionIndex:
    """Reads adapters' current versions from the shared store index (never writes)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._index = None

    def _open(self):
        url = self.settings.store_index_url
        if url in ("", "sqlite"):
            from adapters_store.index import SqliteIndex

            path = Path(self.settings.data_dir) / "adapters" / "index.sqlite3"
            if not path.exists():  # no replica opened the store yet: never create it here
                return None
            return SqliteIndex(path)
        from adapters_store.index_pg import PostgresIndex

        return PostgresIndex(url)  # the replicas create the schema

    def current_version(self, adapter_id: str) -> int | None:
        if self._index is None:
            self._index = self._open()
            if self._index is None:
                return None
        row = self._index.get(adapter_id)
        return None if row is None else row.version


def adapter_of(path: str, body: bytes) -> str | None:
    """The adapter id a generation request names, or None (base model, or no JSON to read)."""
    field = ADAPTER_FIELDS.get(path)
    if field is None or not body:
        return None
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def body_cap(settings: Settings) -> int:
    """The largest body any route accepts (the replica enforces each route's own cap)."""
    return max(
        settings.max_body_bytes, settings.max_upload_bytes + (2 << 20), settings.max_file_bytes + (1 << 20)
    )


def build_ingress(settings: Settings):
    """The ingress deployment class for ``settings`` (its auth keys and body cap)."""
    keys = load_api_keys(settings.api_keys, settings.api_keys_file)
    cap = body_cap(settings)
    app = FastAPI(title="Facet (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthMiddleware, keys=keys)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class FacetIngress:
        def __init__(self, engine):
            self.engine = engine
            self.index = VersionIndex(settings)

        async def multiplex_id(self, method: str, path: str, body: bytes) -> str | None:
            if path.startswith(JOB_PREFIXES):
                return JOBS_MODEL_ID
            adapter_id = adapter_of(path, body) if method == "POST" else None
            if adapter_id is None:
                return None
            try:
                version = await asyncio.to_thread(self.index.current_version, adapter_id)
            except Exception:  # the replica's own lookup reports the problem properly
                log.warning("version lookup of %r failed", adapter_id, exc_info=True)
                return None
            return None if version is None else f"{adapter_id}@{version}"

        @app.get("/metrics")
        async def metrics(self, request: Request):
            if keys and request.scope.get("state", {}).get("api_scope") != "admin":
                return error_response(403, "this route needs an admin key", "header.Authorization")
            texts = await board().current.remote()
            return Response(merge(texts), media_type=METRICS_CONTENT_TYPE)

        @app.api_route("/{path:path}", methods=METHODS)
        async def forward(self, request: Request, path: str):
            body = await _read_capped(request, cap)
            if body is None:
                return error_response(413, f"request body exceeds {cap} bytes", "body")
            path = request.url.path
            model_id = await self.multiplex_id(request.method, path, body)
            options = {"stream": True}
            if model_id is not None:
                options["multiplexed_model_id"] = model_id
            call = {
                "method": request.method,
                "path": path,
                "query": request.scope.get("query_string", b""),
                "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                "body": body,
                "client": (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0),
            }
            responses = self.engine.options(**options).handle_http.remote(call)
            try:
                head = await responses.__anext__()
            except (ray.exceptions.RayError, RuntimeError, StopAsyncIteration) as exc:
                responses.cancel()
                log.warning("engine call failed on %s %s: %r", request.method, path, exc)
                return error_response(503, "no engine replica answered; retry", headers={"Retry-After": "1"})
            return _streamed(head, responses, path)

    return FacetIngress


async def _read_capped(request: Request, cap: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _broken_stream_event(path: str) -> bytes:
    """The error event an SSE client gets when the replica serving its stream dies: the shape the
    route's own stream errors have (``event: error`` on /generate, a bare ``data:`` on /v1)."""
    data = json.dumps(error_body("internal_error", "the engine replica serving this stream failed; retry"))
    return (f"event: error\ndata: {data}\n\n" if path == "/generate" else f"data: {data}\n\n").encode()


def _streamed(head: dict, responses, path: str) -> StreamingResponse:
    """The replica's response, passed through as it arrives (SSE included)."""
    is_sse = any(
        k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in head["headers"]
    )

    async def body():
        try:
            async for chunk in responses:
                yield chunk
        except ray.exceptions.RayError as exc:  # the replica died mid-stream
            log.warning("engine stream broke on %s: %r", path, exc)
            if is_sse:  # no stream ends without saying why; other bodies end truncated
                yield _broken_stream_event(path)
        finally:
            responses.cancel()  # client gone (or done): the replica's request sees a disconnect

    response = StreamingResponse(body(), status_code=head["status"])
    response.raw_headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in head["headers"]
        if k.lower() not in HOP_BY_HOP
    ]
    return response
