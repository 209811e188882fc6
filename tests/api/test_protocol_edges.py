"""Protocol edges over real HTTP (uvicorn on loopback, API keys on): text that cannot be encoded,
duplicate JSON keys, Content-Types, Authorization headers, scope before body, HEAD probes,
trailing-slash redirects, reserved adapter ids and what ``/v1/models`` shows an ``infer`` key.

Keep-alive is checked on one raw HTTP/1.1 connection (h11 over a socket): a second answer on the
same connection proves the server neither closed it nor asked to.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import h11
import httpx
import pytest

from server.app import create_app

from .conftest import adapter_files
from .processes import server_thread
from .tiny_server import BASE_NAME, build_tiny, tiny_settings

ADMIN, INFER = "edges-admin-key", "edges-infer-key"
A = {"Authorization": f"Bearer {ADMIN}"}
I = {"Authorization": f"Bearer {INFER}"}  # noqa: E741
JSON = ("Content-Type", "application/json")
LONE = "t1 \ud800 t2"  # json.dumps writes it as the escape "\ud800": valid JSON, invalid Unicode
NOT_UTF8 = "application/json; charset=latin-1"
GENERATE_OK = json.dumps({"prompt": "t1 t2", "max_new_tokens": 2}).encode()
FINE_TUNE = {
    "adapter_id": "edges-tuned",
    "method": "lora",
    "method_config": {"r": 2},
    "hyperparameters": {"max_steps": 1, "batch_size": 2},
    "training_data": [{"prompt": "t1 t2", "completion": "t3"}],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, object, Path]]:
    """(url, app, data dir) of one tiny server with an admin and an infer key."""
    data = tmp_path_factory.mktemp("edges") / "data"
    settings = tiny_settings(data_dir=data, api_keys=[f"admin:{ADMIN}", f"infer:{INFER}"])
    engine, store = build_tiny(settings)
    app = create_app(settings, engine=engine, store=store)
    with server_thread(app) as url:
        yield url, app, data


@pytest.fixture
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], headers=A, timeout=60) as client:
        yield client


class Connection:
    """One HTTP/1.1 connection, reused for every request (never reopened)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host = parts.netloc
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.h11 = h11.Connection(h11.CLIENT)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send_head(self, method: str, path: str, headers: list, length: int) -> None:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()  # raises if the server said "Connection: close"
        head = [("Host", self.host), ("Content-Length", str(length)), *headers]
        self.sock.sendall(self.h11.send(h11.Request(method=method, target=path, headers=head)))

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body = None, {}, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the server closed the connection")

    def request(self, method: str, path: str, body: bytes = b"", headers=(A["Authorization"],)):
        hdrs = [("Authorization", h) for h in headers] + ([JSON] if body else [])
        self.send_head(method, path, hdrs, len(body))
        self.sock.sendall(self.h11.send(h11.Data(data=body)) if body else b"")
        self.sock.sendall(self.h11.send(h11.EndOfMessage()))
        return self.response()


@pytest.fixture
def conn(served) -> Iterator[Connection]:
    with Connection(served[0]) as connection:
        yield connection


def assert_error(status: int, body: bytes, want: int, where: str | None, *needles: str) -> dict:
    assert status == want, body
    error = json.loads(body)["error"]
    assert error.get("where") == where, error
    for needle in needles:
        assert needle in error["message"], error
    return error


def assert_still_serving(conn: Connection) -> None:
    status, headers, body = conn.request("POST", "/generate", GENERATE_OK)
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 2
    assert headers.get("connection", "").lower() != "close"


def json_routes(http: httpx.Client) -> list[tuple[str, str, dict]]:
    """(method, path, operation) of every operation taking a JSON body, from the OpenAPI schema."""
    schema = http.get("/openapi.json").json()
    return [
        (method.upper(), path, op)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
    ]


# ---------------------------------------------------------------- text that cannot be encoded


TWO_TURNS = [{"role": "user", "content": "t1"}, {"role": "user", "content": LONE}]
LONE_BODIES = [
    ("/generate", {"prompt": LONE}, "body.prompt"),
    ("/generate", {"messages": [{"role": "user", "content": LONE}]}, "body.messages.0.content"),
    ("/generate", {"prompt": "t1", "stop": ["t9", LONE]}, "body.stop.1"),
    ("/v1/completions", {"model": BASE_NAME, "prompt": LONE}, "body.prompt"),
    ("/v1/completions", {"model": BASE_NAME, "prompt": [LONE]}, "body.prompt.0"),
    (
        "/v1/chat/completions",
        {"model": BASE_NAME, "messages": TWO_TURNS},
        "body.messages.1.content",
    ),
    (
        "/v1/chat/completions",
        {"model": BASE_NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        "body.messages.0.content.0.text",
    ),
]


@pytest.mark.parametrize(("path", "body", "where"), LONE_BODIES)
def test_a_lone_surrogate_in_generation_text_is_422_and_the_connection_stays_usable(conn, path, body, where):
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw  # the escape itself travels: the body is valid UTF-8 and valid JSON
    status, headers, answer = conn.request("POST", path, raw)
    assert_error(status, answer, 422, where, "lone surrogate")
    assert headers.get("connection", "").lower() != "close"
    assert_still_serving(conn)


def test_a_lone_surrogate_as_an_object_key_is_422(conn):
    status, _, answer = conn.request("POST", "/generate", b'{"prompt": "t1", "\\udc00": 1}')
    assert_error(status, answer, 422, "body", "object key", "lone surrogate")
    assert_still_serving(conn)


def _jobs_total(conn: Connection) -> int:
    status, _, body = conn.request("GET", "/fine-tunes")
    assert status == 200, body
    return json.loads(body)["total"]


@pytest.mark.parametrize(
    ("training_data", "where", "needle"),
    [
        ([{"prompt": "t1", "completion": LONE}], "body.training_data.0.completion", "lone surrogate"),
        (json.dumps({"prompt": LONE, "completion": "t3"}) + "\n", "body.training_data", "line 1"),
    ],
    ids=["records", "jsonl-text"],
)
def test_a_lone_surrogate_in_training_data_is_422_and_no_job_is_made(conn, training_data, where, needle):
    before = _jobs_total(conn)
    raw = json.dumps({**FINE_TUNE, "training_data": training_data}).encode()
    status, _, answer = conn.request("POST", "/fine-tunes", raw)
    assert_error(status, answer, 422, where, needle, "surrogate")
    assert _jobs_total(conn) == before
    status, _, _ = conn.request("GET", f"/adapters/{FINE_TUNE['adapter_id']}")
    assert status == 404
    assert_still_serving(conn)


def _multipart(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "edgesboundary0123"
    out = bytearray()
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def test_a_lone_surrogate_in_an_uploaded_file_is_422_naming_the_line_and_nothing_is_stored(conn, served):
    objects = served[2] / "adapters" / "files"  # the local blob store's training-file objects

    def stored() -> list[str]:
        return sorted(p.name for p in objects.iterdir()) if objects.exists() else []

    stored_before = stored()
    status, _, listing = conn.request("GET", "/files")
    listed_before = json.loads(listing)["data"]
    chat = [{"role": "user", "content": "t1"}, {"role": "assistant", "content": LONE}]
    jsonl = f"{json.dumps({'prompt': 't1', 'completion': 't2'})}\n{json.dumps({'messages': chat})}".encode()
    body, ctype = _multipart([("purpose", None, b"fine-tune"), ("file", "train.jsonl", jsonl)])
    headers = [("Authorization", A["Authorization"]), ("Content-Type", ctype)]
    conn.send_head("POST", "/files", headers, len(body))
    conn.sock.sendall(conn.h11.send(h11.Data(data=body)) + conn.h11.send(h11.EndOfMessage()))
    status, _, answer = conn.response()
    assert_error(status, answer, 422, "body.file", "line 2", "messages[1].content", "lone surrogate")
    assert stored() == stored_before
    status, _, listing = conn.request("GET", "/files")
    assert status == 200 and json.loads(listing)["data"] == listed_before
    good = json.dumps({"prompt": "t1", "completion": "t2"}).encode()  # the check can see a stored file
    body, ctype = _multipart([("purpose", None, b"fine-tune"), ("file", "ok.jsonl", good)])
    conn.send_head(
        "POST", "/files", [("Authorization", A["Authorization"]), ("Content-Type", ctype)], len(body)
    )
    conn.sock.sendall(conn.h11.send(h11.Data(data=body)) + conn.h11.send(h11.EndOfMessage()))
    status, _, answer = conn.response()
    assert status == 201, answer
    assert len(stored()) == len(stored_before) + 1
    assert_still_serving(conn)


def test_a_lone_surrogate_in_an_adapter_config_is_422_and_nothing_is_stored(http, served, tmp_path):
    config, weights = adapter_files(served[1], "lora", tmp_path / "l", seed=3)
    bad = json.dumps({**json.loads(config), "base_model_name_or_path": LONE}).encode()
    files = {"config": ("adapter_config.json", bad), "weights": ("adapter_model.safetensors", weights)}
    response = http.post("/adapters", data={"adapter_id": "edges-lone"}, files=files)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["where"] == "base_model_name_or_path"
    assert http.get("/adapters/edges-lone").status_code == 404


# ------------------------------------------------------------------------ JSON bodies, strictly


def test_every_json_route_refuses_duplicate_keys_naming_the_key(http):
    routes = json_routes(http)
    assert {path for _, path, _ in routes} >= {"/generate", "/v1/completions", "/v1/chat/completions"}
    duplicates = [
        (b'{"prompt": "t1", "prompt": "t2", "model": "m"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "t1", "role": "system"}]}', "role"),
    ]
    for method, path, _ in routes:
        for raw, key in duplicates:
            response = http.request(method, path, content=raw, headers=dict([JSON]))
            assert response.status_code == 422, (path, response.text)
            error = response.json()["error"]
            assert error["where"] == "body" and f"duplicate key '{key}'" in error["message"], (path, error)


def test_every_json_route_answers_415_for_a_body_that_is_not_json(http):
    for method, path, op in json_routes(http):
        assert "415" in op["responses"], (path, "415 is not documented")
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None, NOT_UTF8):
            headers = {"Content-Type": ctype} if ctype else {}
            response = http.request(method, path, content=b'{"prompt": "t1"}', headers=headers)
            assert response.status_code == 415, (path, ctype, response.text)
            error = response.json()["error"]
            assert error["type"] == "unsupported_media_type" and error["where"] == "header.Content-Type"
    for ctype in ("application/json; charset=UTF-8", "application/vnd.facet+json"):
        response = http.post("/generate", content=GENERATE_OK, headers={"Content-Type": ctype})
        assert response.status_code == 200, (ctype, response.text)


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b'{"prompt": "t1", "temperature": NaN}', 422, "NaN"),
        (b'{"prompt": "t1", "temperature": 1e999}', 422, "out of range"),
        (b'{"prompt": "t1", "seed": ' + b"9" * 5000 + b"}", 422, "not valid JSON"),
        (b"[" * 100_000, 422, "nests too deeply"),
        (b'{"prompt": "t1"', 422, "not valid JSON"),
        ('{"prompt": "t1"}'.encode("utf-16"), 400, "not UTF-8"),
        (b'{"prompt": "\xed\xa0\x80"}', 400, "not UTF-8"),  # a surrogate encoded as UTF-8 bytes
    ],
    ids=["nan", "inf", "huge-int", "deep", "truncated", "utf16", "utf8-surrogate"],
)
def test_bodies_that_are_not_strict_json_are_4xx_on_a_kept_connection(conn, raw, status, needle):
    got, _, answer = conn.request("POST", "/generate", raw)
    assert_error(got, answer, status, "body", needle)
    assert_still_serving(conn)


# -------------------------------------------------------------------------- headers and routing


def test_two_authorization_headers_are_400(conn):
    for pair in ((f"Bearer {ADMIN}", f"Bearer {INFER}"), (f"Bearer {ADMIN}", f"Bearer {ADMIN}")):
        status, _, body = conn.request("POST", "/generate", GENERATE_OK, headers=pair)
        assert_error(status, body, 400, "header.Authorization", "more than one Authorization header")
        assert ADMIN not in body.decode() and INFER not in body.decode()
    status, _, _ = conn.request("GET", "/health", headers=(f"Bearer {ADMIN}", "Bearer x"))
    assert status == 200  # open paths ignore Authorization
    assert_still_serving(conn)


def test_the_scope_is_checked_before_the_body_is_read(conn, served):
    infer = (I["Authorization"],)
    for raw in (b"{not json", b'{"a": 1, "a": 2}', json.dumps({**FINE_TUNE, "adapter_id": LONE}).encode()):
        status, _, body = conn.request("POST", "/fine-tunes", raw, headers=infer)
        assert_error(status, body, 403, None, "'admin' scope")
    # Headers only: the body never comes. An answer at all means it was not waited for.
    with Connection(served[0]) as other:
        headers = [("Authorization", I["Authorization"]), ("Content-Type", "text/plain")]
        other.send_head("POST", "/fine-tunes", headers, 1 << 20)
        status, _, body = other.response()
        assert_error(status, body, 403, None, "'admin' scope")


def test_head_health_and_ready_are_200_without_a_body(conn):
    for path in ("/health", "/ready"):
        status, _, body = conn.request("HEAD", path, headers=())
        assert status == 200 and body == b"", (path, status, body)
    assert_still_serving(conn)


def test_no_redirect_reflects_the_host_header(http):
    paths = [("POST", "/generate/"), ("GET", "/adapters/"), ("GET", "/v1/models/"), ("GET", "/health/")]
    for method, path in paths:
        response = http.request(method, path, json={"prompt": "t1"}, headers={"Host": "evil.example"})
        assert response.status_code == 404, (path, response.status_code)
        assert "location" not in response.headers and "evil.example" not in response.text
        assert response.json()["error"]["type"] == "not_found"


# -------------------------------------------------------------------------------- adapter ids


def test_new_adapter_ids_cannot_be_the_base_models_name_in_any_case_nor_hold_an_at(http, served, tmp_path):
    config, weights = adapter_files(served[1], "lora", tmp_path / "l", seed=4)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    cases = [(BASE_NAME, "base model's name"), (BASE_NAME.upper(), "base model's name")]
    cases += [("Tiny-Llama", "base model's name"), ("edges@12", "'@' is reserved")]
    for adapter_id, needle in cases:
        response = http.post("/adapters", data={"adapter_id": adapter_id}, files=files)
        assert response.status_code == 422, (adapter_id, response.text)
        error = response.json()["error"]
        assert error["where"] == "body.adapter_id" and needle in error["message"], error
        assert http.get(f"/adapters/{adapter_id}").status_code == 404
    for adapter_id, needle in [("TINY-llama", "base model's name"), ("edges@3", "letters, digits")]:
        response = http.post("/fine-tunes", json={**FINE_TUNE, "adapter_id": adapter_id})
        assert response.status_code == 422, (adapter_id, response.text)
        error = response.json()["error"]
        assert error["where"] == "body.adapter_id" and needle in error["message"], error
    # Checkpoint ids stay valid where adapters are looked up: unknown, not malformed.
    response = http.post("/generate", json={"prompt": "t1", "adapter": "edges@12", "max_new_tokens": 1})
    assert response.status_code == 404 and response.json()["error"]["where"] == "body.adapter"
    assert http.post("/adapters", data={"adapter_id": "edges-ok"}, files=files).status_code == 201


def test_v1_models_lists_adapters_to_admin_keys_only(http, served, tmp_path):
    config, weights = adapter_files(served[1], "hut", tmp_path / "h", seed=5)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    assert http.post("/adapters", data={"adapter_id": "edges-listed"}, files=files).status_code == 201
    admin_ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert admin_ids[0] == BASE_NAME and "edges-listed" in admin_ids
    infer_ids = [m["id"] for m in http.get("/v1/models", headers=I).json()["data"]]
    assert infer_ids == [BASE_NAME]
    card = http.get("/v1/models/edges-listed", headers=I)  # an id the caller was given: served
    assert card.status_code == 200 and card.json()["parent"] == BASE_NAME
    assert http.get("/metrics", headers=I).status_code == 403  # the same rule


# --------------------------------------------------------------- what errors never show (ASGI)


@pytest.mark.asyncio
async def test_chat_rendering_errors_name_no_internal_types(client, monkeypatch):
    tokenizer = client.app.state.runtime.engine.base.tokenizer
    internal = "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"

    def broken(*args, **kwargs):
        raise TypeError(internal)

    monkeypatch.setattr(tokenizer, "apply_chat_template", broken)
    chat = [{"role": "user", "content": "t1"}]
    bodies = [("/generate", {}), ("/v1/chat/completions", {"model": BASE_NAME})]
    for path, body in bodies:
        response = await client.post(path, json={**body, "messages": chat})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["where"] == "body.messages" and "could not render" in error["message"]
        assert "TextEncode" not in response.text and "TypeError" not in response.text
    monkeypatch.undo()
    # A template's own raise_exception(...) message is meant for the client: it is shown.
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    response = await client.post("/generate", json={"messages": chat})
    assert response.status_code == 422 and "roles must alternate" in response.json()["error"]["message"]


@pytest.mark.asyncio
async def test_an_unexpected_error_is_a_generic_500(client, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("LlamaTokenizerFast at 0x7f00 exploded")

    monkeypatch.setattr(client.app.state.runtime.engine, "submit_many", explode)
    response = await client.post("/generate", json={"prompt": "t1", "max_new_tokens": 1})
    assert response.status_code == 500
    assert response.json() == {"error": {"type": "internal_error", "message": "internal server error"}}
