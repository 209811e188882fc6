"""Hostile adapter uploads over real HTTP, end to end (docs/checklist.md B, #12-25).

tests/store/test_validation.py proves each check in the store; tests/api/test_adapters.py runs a
few through the in-process app. This file sends the attacks to a real server (a subprocess:
uvicorn, sockets, multipart streamed to a temp file) and proves, for every one:

* a specific 4xx whose JSON error body names the problem (``where`` and a message fragment);
* no absolute path, stack trace or server file name in the body;
* afterwards nothing changed on disk outside the store's own bookkeeping: the data dir's tree
  is identical (no staging or upload leftovers, nothing written by a traversal id), the
  listing is unchanged, and the adapter uploaded first still generates;
* nothing was unpickled (a pickle's side-effect canary file never appears).

Also: a declared-oversized body is refused with 413 before it is sent; a streamed oversized
body is cut off at the cap; a client that trickles bytes holds only its own connection (the
server keeps answering) and its temp file is removed when it gives up; a client that stops
sending gets 408 after ``upload_idle_timeout_s`` and its temp file is removed at once.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save

from server.engine.loader import wrap_model
from tests.api.conftest import adapter_files
from tests.api.processes import REPO, server_process
from tests.api.tiny_server import BASE_NAME, TARGETS
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.store.helpers import assemble, split

ADMIN_KEY = "hostile-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_UPLOAD = 64 << 10  # weights cap; the whole multipart body may be ~128 KiB more
EXISTING = "existing-lora"
IDLE_TIMEOUT_S = 2.0


class Canary:
    """Unpickling this creates ``path``: the server must never unpickle an upload."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    args = ["--data-dir", str(data), "--api-keys", f"admin:{ADMIN_KEY}"]
    args += ["--max-upload-bytes", str(MAX_UPLOAD), "--upload-idle-timeout-s", str(IDLE_TIMEOUT_S)]
    base = wrap_model(BASE_NAME, make_tiny_llama(), make_tokenizer(), TARGETS)
    config, weights = adapter_files(base, "lora", root / "files")
    with server_process("tests.api.tiny_server", args, root / "server.log") as url:
        assert upload(url, EXISTING, config, weights).status_code == 201
        yield {"url": url, "root": root, "data": data, "config": config, "weights": weights}


def upload(url: str, adapter_id: str, config: bytes, weights: bytes, **kw) -> httpx.Response:
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    return httpx.post(url + "/adapters", data={"adapter_id": adapter_id}, files=files, headers=AUTH, **kw)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` -> (size, mtime_ns); the log and SQLite journals left out."""
    skip = re.compile(r"server\.log$|\.sqlite3(-wal|-shm|-journal)?$")
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not skip.search(p.name)
    }


def assert_clean_error(response: httpx.Response, server: dict) -> dict:
    error = response.json()["error"]
    assert set(error) <= {"type", "message", "where"} and error["message"]
    text = response.text
    for leak in (str(server["root"]), str(REPO), "Traceback", 'File "', "site-packages", '.py"'):
        assert leak not in text, f"{leak!r} leaked in {text}"
    assert not re.search(r"(/tmp/|/root/|/home/|/work/|/var/)", text), text
    return error


def assert_unharmed(server: dict, before: dict) -> None:
    """Nothing on disk changed, no leftovers, the listing is the same, the old adapter serves."""
    url, data = server["url"], server["data"]
    assert snapshot(server["root"]) == before
    assert list((data / "uploads").iterdir()) == []
    assert list((data / "adapters" / "staging").iterdir()) == []
    listed = httpx.get(url + "/adapters", headers=AUTH).json()
    assert [a["adapter_id"] for a in listed["adapters"]] == [EXISTING]
    body = {"prompt": "t1 t2", "adapter": EXISTING, "max_new_tokens": 2}
    out = httpx.post(url + "/generate", json=body, headers=AUTH, timeout=30)
    assert out.status_code == 200 and out.json()["adapter_version"] == 1, out.text


# --------------------------------------------------------------------- hostile weights and configs


def _edit(weights: bytes, fn) -> bytes:
    header, data = split(weights)
    fn(header)
    return assemble(header, data)


def _first(header: dict) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _value(weights: bytes, value: float) -> bytes:
    tensors = st_load(weights)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[3] = value
    return save(tensors)


def _dup(weights: bytes) -> bytes:  # the first tensor twice, aliasing the same bytes
    header, data = split(weights)
    name = _first(header)
    text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    return assemble(text, data)


def _in_file_order(header: dict) -> list[dict]:
    return sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])


def _past_eof(header: dict) -> None:  # the last tensor one row longer: consistent, but past EOF
    last = _in_file_order(header)[-1]
    last["shape"][0] += 1
    last["data_offsets"][1] += 4 * last["shape"][1]


def _overlap(header: dict) -> None:  # the second tensor in file order starts 4 bytes early
    second = _in_file_order(header)[1]
    second["data_offsets"] = [o - 4 for o in second["data_offsets"]]


def _reverse_offsets(header: dict) -> None:
    entry = header[_first(header)]
    entry["data_offsets"] = entry["data_offsets"][::-1]


def _set(key: str, value):
    return lambda header: header[_first(header)].__setitem__(key, value)


def _header_length(n):
    return lambda w, tmp: struct.pack("<Q", n(w)) + w[8:]


def _n(w: bytes) -> int:
    return struct.unpack("<Q", w[:8])[0]


def _attack(case: str, build, status: int, where: str | None, fragment: str):
    """``build(valid weights, tmp dir)`` -> hostile weights; ``where`` "first" = the first tensor."""
    return pytest.param(build, status, where, fragment, id=case)


WEIGHTS_ATTACKS = [
    _attack("torch-zip", lambda w, tmp: _torch_zip(tmp), 422, "weights", "zip"),
    _attack("empty", lambda w, tmp: b"", 422, "weights", "shorter than the 8-byte"),
    _attack("n-2^64-1", _header_length(lambda w: 2**64 - 1), 422, "weights", "header length"),
    _attack("n-past-eof", _header_length(len), 422, "weights", "header length"),
    _attack("n-zero", _header_length(lambda w: 0), 422, "weights", "header length"),
    _attack("n-plus-one", _header_length(lambda w: _n(w) + 1), 422, "weights", "not a safetensors file"),
    _attack("trailing-bytes", lambda w, tmp: w + b"PK\x03\x04polyglot", 422, "weights", "trailing"),
    _attack("overlap", lambda w, tmp: _edit(w, _overlap), 422, None, "overlap the previous tensor"),
    _attack("past-eof", lambda w, tmp: _edit(w, _past_eof), 422, None, "past the end of the data"),
    _attack("begin-after-end", lambda w, tmp: _edit(w, _reverse_offsets), 422, "first", "begin"),
    _attack("dtype-lie", lambda w, tmp: _edit(w, _set("dtype", "F16")), 422, "first", "needs"),
    _attack("dtype-f64", lambda w, tmp: _edit(w, _set("dtype", "F64")), 422, "first", "dtype"),
    _attack("dtype-int", lambda w, tmp: _edit(w, _set("dtype", "I32")), 422, "first", "dtype"),
    _attack("shape-lie", lambda w, tmp: _edit(w, _set("shape", [3, 3])), 422, "first", "needs"),
    _attack("shape-overflow", lambda w, tmp: _edit(w, _set("shape", [2**62, 2**62])), 422, "first", "needs"),
    _attack("duplicate-key", lambda w, tmp: _dup(w), 422, "first", "duplicate"),
    _attack("nan", lambda w, tmp: _value(w, float("nan")), 422, "first", "NaN or Inf"),
    _attack("inf", lambda w, tmp: _value(w, float("inf")), 422, "first", "NaN or Inf"),
    _attack("huge", lambda w, tmp: _value(w, 1e30), 422, "first", "max_abs_value"),
    _attack("over-cap", lambda w, tmp: w + b"\0" * MAX_UPLOAD, 413, "body.weights", "exceeds"),
]


def _torch_zip(tmp: Path) -> bytes:
    torch.save({"w": torch.zeros(2)}, tmp / "ckpt.bin")
    return (tmp / "ckpt.bin").read_bytes()


@pytest.mark.parametrize("build,status,where,fragment", WEIGHTS_ATTACKS)
def test_hostile_weights(server, tmp_path, build, status, where, fragment):
    weights = build(server["weights"], tmp_path)
    before = snapshot(server["root"])
    response = upload(server["url"], "new-adapter", server["config"], weights)
    assert response.status_code == status, response.text
    error = assert_clean_error(response, server)
    if where == "first":
        where = _first(split(server["weights"])[0])
    assert where is None or error["where"] == where, error
    assert fragment in error["message"], error
    assert_unharmed(server, before)


def test_pickle_named_safetensors_is_never_unpickled(server, tmp_path):
    canary = tmp_path / "canary"
    before = snapshot(server["root"])
    weights = pickle.dumps(Canary(canary), protocol=4)
    response = upload(server["url"], "new-adapter", server["config"], weights)
    assert response.status_code == 422
    error = assert_clean_error(response, server)
    assert error["where"] == "weights" and "pickle" in error["message"], error
    assert not canary.exists()
    assert_unharmed(server, before)


CONFIG_ATTACKS = {
    "auto_map": {"auto_map": {"AutoModel": "evil.Model"}},
    "trust_remote_code": {"trust_remote_code": True},
    "tokenizer_kwargs": {"tokenizer_kwargs": {"trust_remote_code": True}},
    "auto_mapping": {"auto_mapping": {"parent_library": "os", "evil": "x"}},
    "target_modules": {"target_modules": ["../../etc/passwd"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "peft_type": {"peft_type": "PROMPT_TUNING"},
    "use_dora": {"use_dora": "yes"},  # use_dora: true is DoRA (served); anything else not a bool is refused
}


@pytest.mark.parametrize("field", CONFIG_ATTACKS)
def test_config_fields_that_could_import_code_or_reach_files(server, field):
    config = {**json.loads(server["config"]), **CONFIG_ATTACKS[field]}
    before = snapshot(server["root"])
    response = upload(server["url"], "new-adapter", json.dumps(config).encode(), server["weights"])
    assert response.status_code == 422, response.text
    assert assert_clean_error(response, server)["where"].split(".")[0] == field
    assert_unharmed(server, before)


# --------------------------------------------------------------------------------- hostile ids

HOSTILE_IDS = [
    *("../escaped", "../../etc/passwd", "/abs/path", "a/b", "..", "a..b", "%2e%2e%2f", "a\\b"),
    *("a\x00b", "x\n", "http://169.254.169.254/", "\uff41bc", ".hidden", BASE_NAME),
]


@pytest.mark.parametrize("adapter_id", HOSTILE_IDS, ids=repr)
def test_hostile_adapter_ids(server, adapter_id):
    before = snapshot(server["root"])
    response = upload(server["url"], adapter_id, server["config"], server["weights"])
    assert response.status_code == 422, response.text
    error = assert_clean_error(response, server)
    assert error["where"].endswith("adapter_id"), error
    assert_unharmed(server, before)


def test_oversized_id_part_is_413(server):
    before = snapshot(server["root"])
    response = upload(server["url"], "a" * 5000, server["config"], server["weights"])
    assert response.status_code == 413
    assert assert_clean_error(response, server)["where"] == "body.adapter_id"
    assert_unharmed(server, before)


TRAVERSAL_URLS = [
    "/adapters/..%2F..%2Fetc",
    "/adapters/%2e%2e",
    "/adapters/a%00b",
    "/adapters/..%2Fexisting-lora",
]


@pytest.mark.parametrize("path", TRAVERSAL_URLS)
def test_traversal_in_delete_urls_deletes_nothing(server, path):
    before = snapshot(server["root"])
    response = httpx.delete(server["url"] + path, headers=AUTH)
    assert response.status_code in (404, 422), response.text
    assert_clean_error(response, server)
    assert_unharmed(server, before)


# ------------------------------------------------------------------------- size and speed abuse


def _raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 10:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_declared_oversize_body_is_refused_before_it_is_sent(server):
    before = snapshot(server["root"])
    head = (
        f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {10 << 30}\r\n"
    )  # 10 GiB announced, 10 bytes sent
    with _raw_request(server["url"], head, b"--b\r\nxxxxx") as sock:
        reply = _read_response(sock)  # answered with 10 of the 10 GiB sent: refused on the header
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"payload_too_large" in reply
    assert_unharmed(server, before)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_streamed_oversize_body_is_cut_off_at_the_cap(server):
    """No Content-Length, 4 MiB of weights: the temp file never grows past the cap, the answer is
    413 (or the connection is closed on us), the temp file is gone."""
    before = snapshot(server["root"])
    uploads = server["data"] / "uploads"
    largest = 0

    def chunks():
        nonlocal largest
        yield b'--b\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\nbig\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
        for _ in range(64):
            time.sleep(0.02)  # let the server write what it got; then look at its temp file
            largest = max([largest] + [_size(p) for p in uploads.glob("upload-*")])
            yield b"\0" * 65536

    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    try:
        response = httpx.post(server["url"] + "/adapters", content=chunks(), headers=headers, timeout=30)
    except httpx.TransportError:  # the server may close while we are still writing
        response = None
    if response is not None:
        assert response.status_code == 413, response.text
        assert "exceeds" in assert_clean_error(response, server)["message"]
    assert 0 < largest <= MAX_UPLOAD
    assert_unharmed(server, before)


def test_trickling_upload_does_not_block_the_server(server):
    """A client sending a byte at a time holds its own connection only; when it gives up, its
    temp file goes (each byte comes well within the idle timeout, so it is not cut off)."""
    before = snapshot(server["root"])
    head = (
        f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
    with _raw_request(server["url"], head, part) as sock:
        for i in range(20):
            sock.sendall(b"\0")
            time.sleep(0.05)
            if i % 5 == 0:  # meanwhile the server answers others (a blocked loop would time out)
                assert httpx.get(server["url"] + "/health", timeout=10).status_code == 200
        assert len(list((server["data"] / "uploads").iterdir())) == 1  # its temp file, in uploads/
    deadline = time.monotonic() + 10
    while list((server["data"] / "uploads").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_unharmed(server, before)


def test_a_stalled_upload_gets_408_and_its_temp_file_goes(server):
    before = snapshot(server["root"])
    head = (
        f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n' + b"\0" * 100
    started = time.monotonic()
    with _raw_request(server["url"], head, part) as sock:  # then nothing more: the client stalls
        answer = _read_response(sock)
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"stalled" in answer and waited >= IDLE_TIMEOUT_S  # (the socket times out at 10 s)
        assert list((server["data"] / "uploads").iterdir()) == []  # gone while the socket is open
    assert_unharmed(server, before)
