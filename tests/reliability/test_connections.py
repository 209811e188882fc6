"""Connection guards over real sockets: stalled heads and bodies, the connection cap, log floods.

A tiny-model app served by uvicorn with ``server.connections.uvicorn_config`` (what
``python -m server`` runs) from a thread of the test process, on loopback. Raw sockets send
exactly the bytes a stalling client would. Every wait ends on an answer or a closed socket; the
socket timeouts only guard against a hang.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from server import log_limit
from server.connections import uvicorn_config
from tests.api.processes import free_port, wait_ready
from tests.api.tiny_server import create_tiny_app, tiny_settings

HANG_GUARD_S = 30.0


@contextmanager
def live_server(tmp_path, **overrides) -> Iterator[tuple[uvicorn.Server, int]]:
    settings = tiny_settings(data_dir=tmp_path / "data", **overrides)
    port = free_port()
    config = uvicorn_config(
        create_tiny_app(settings), settings, host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-connections")
    thread.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, alive=thread.is_alive)
        yield server, port
    finally:
        server.should_exit = True
        thread.join(30)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
    sock.settimeout(HANG_GUARD_S)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def until(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def stalling_server(tmp_path):
    with live_server(tmp_path, header_timeout_s=0.5, upload_idle_timeout_s=0.5) as (_, port):
        yield port


def test_a_json_body_that_stalls_gets_408(stalling_server):
    with connect(stalling_server) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: facet\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": "t1'
        )
        status, headers, body = parse(read_all(sock))
    assert status == 408
    assert body["error"]["where"] == "body" and "upload_idle_timeout_s" in body["error"]["message"]
    assert headers["connection"] == "close"


def test_a_request_head_that_stalls_gets_408_and_a_silent_connection_is_closed(stalling_server):
    with connect(stalling_server) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: facet\r\nContent-Type: appl")
        status, _, body = parse(read_all(sock))
    assert status == 408 and "header_timeout_s" in body["error"]["message"]
    with connect(stalling_server) as sock:  # never sends a byte: closed without an answer
        assert read_all(sock) == b""
    with connect(stalling_server) as sock:  # a complete request on a fresh connection still works
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: facet\r\nConnection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_cap_are_refused_at_once_with_503(tmp_path):
    with live_server(tmp_path, max_connections=3, header_timeout_s=HANG_GUARD_S) as (server, port):
        until(lambda: not server.server_state.connections, "wait_ready's connections closed")
        held = [connect(port) for _ in range(3)]
        try:
            until(lambda: len(server.server_state.connections) == 3, "three connections open")
            with connect(port) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: facet\r\n\r\n")
                status, headers, body = parse(read_all(extra))  # answered and closed, not queued
            assert status == 503 and headers["retry-after"] == "1"
            assert "max_connections=3" in body["error"]["message"]
            held.pop().close()
            until(lambda: len(server.server_state.connections) == 2, "a held connection closed")
            with connect(port) as again:
                again.sendall(b"GET /health HTTP/1.1\r\nHost: facet\r\nConnection: close\r\n\r\n")
                assert read_all(again).startswith(b"HTTP/1.1 200")
        finally:
            for sock in held:
                sock.close()


# ---------------------------------------------------------------------------- log rate limit


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, exc_info)


def test_repeated_out_of_resource_records_are_rate_limited_with_a_count():
    now = [0.0]
    repeat = log_limit.RepeatFilter(every_s=10.0, clock=lambda: now[0])
    accept = "socket.accept() out of system resource"
    emfile = OSError(24, "Too many open files")
    passed = []
    for i in range(100):
        now[0] = i * 0.05
        passed += [r for r in (_record(accept), _record("handler failed", emfile)) if repeat.filter(r)]
        assert repeat.filter(_record(f"ordinary record {i}"))  # everything else passes untouched
    assert [r.getMessage() for r in passed] == [accept, "handler failed"]  # one of each kind
    now[0] = 10.5
    later = _record(accept)
    assert repeat.filter(later)
    assert later.getMessage() == f"{accept} (99 similar records suppressed since the last one)"
    assert not repeat.filter(_record(accept))


def test_install_filters_records_propagated_from_child_loggers():
    out = io.StringIO()
    parent = logging.getLogger("facet-test-log-limit")
    handler = logging.StreamHandler(out)
    parent.addHandler(handler)
    parent.propagate = False
    try:
        log_limit.install(parent, every_s=3600)
        child = logging.getLogger("facet-test-log-limit.asyncio")
        for _ in range(50):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                child.exception("socket.accept() out of system resource")
        child.error("something else")
    finally:
        parent.removeHandler(handler)
    text = out.getvalue()
    assert text.count("out of system resource") == 1 and text.count("Traceback") == 1
    assert "something else" in text
