"""Schemathesis against the server's own ``/openapi.json``, over real HTTP (docs/checklist.md #11).

A tiny random-weight server runs as a subprocess (uvicorn, real sockets, a temp data dir, an
admin key). Every operation in its schema - generation (native and OpenAI, streaming too),
``/v1/models``, multipart ``/adapters`` uploads, downloads and deletes, ``/fine-tunes`` - gets
schema-valid (positive) and schema-violating (negative) requests, and every answer must pass:

* ``not_a_server_error``: never a 5xx;
* ``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``: the status is documented for the route, the content type is
  the documented one and the body matches the documented schema (errors included);
* ``negative_data_rejection``: schema-violating requests are refused with a 4xx;
* ``missing_required_header``, ``unsupported_method``: schemathesis' protocol checks.

``negative_data_rejection`` also takes 413 as a rejection: a multipart part over its byte cap
(``adapter_id`` 1 KiB, ``purpose`` 64 B) is refused with 413 naming the part, before it is
buffered (docs/api.md), whatever else is wrong with it.

Excluded, on purpose: ``positive_data_acceptance``. The server has rules the schema cannot state
(caps that come from settings such as ``max_new_tokens`` and ``max_prompt_tokens``, "exactly one
of prompt and messages", an adapter id must not contain ``..``, uploaded files must be a valid
adapter): schema-valid requests that break them are rightly answered 422.

Afterwards the server must still be whole: it generates, the fuzzed uploads left nothing in the
upload or staging folders, and every listed adapter downloads.

Default (``make test``): a few examples per operation; ``-m slow``: many more.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.app import create_app
from server.engine.loader import wrap_model
from server.settings import settings_from_cli
from tests.api.conftest import adapter_files
from tests.api.processes import server_process
from tests.api.tiny_server import BASE_NAME, TARGETS, tiny_settings
from tests.conftest import make_tiny_llama, make_tokenizer

ADMIN_KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SEED = "seed-lora"  # uploaded before fuzzing: must still be served afterwards
# Small caps keep every generated request cheap on 2 CPU cores.
SERVER_ARGS = [
    "--max-new-tokens", "4",
    "--max-prompt-tokens", "64",
    "--max-upload-bytes", "65536",
    "--max-queue", "64",
]  # fmt: skip
EXCLUDED = [positive_data_acceptance]  # see the module docstring
FAST = settings(
    max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> tuple[str, Path]:
    """The server, with one real adapter uploaded before the fuzzing starts."""
    data = tmp_path_factory.mktemp("schema-fuzz")
    args = ["--data-dir", str(data), "--api-keys", f"admin:{ADMIN_KEY}", *SERVER_ARGS]
    base = wrap_model(BASE_NAME, make_tiny_llama(), make_tokenizer(), TARGETS)
    config, weights = adapter_files(base, "lora", data / "seed-files")
    with server_process("tests.api.tiny_server", args, data / "server.log") as url:
        files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
        response = httpx.post(url + "/adapters", data={"adapter_id": SEED}, files=files, headers=AUTH)
        assert response.status_code == 201, response.text
        yield url, data


def _app_schema() -> dict:
    """The OpenAPI document of an app built exactly as the subprocess builds it (nothing loaded:
    the model and store only come to life in the lifespan). ``test_live_schema_is_this_one``
    checks the running server serves the same document. (Schemathesis' lazy ``from_fixture``
    loader does not work with pytest 9, hence an eager schema.)"""
    with tempfile.TemporaryDirectory() as tmp:
        cli = settings_from_cli(["--data-dir", tmp, "--api-keys", f"admin:{ADMIN_KEY}", *SERVER_ARGS])
        return create_app(tiny_settings(**cli.model_dump(exclude_unset=True))).openapi()


APP_SCHEMA = _app_schema()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)
_rejection = schema.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]  # see the module docstring


def test_live_schema_is_this_one(fuzz_server):
    url, _ = fuzz_server
    assert httpx.get(url + "/openapi.json", headers=AUTH).json() == APP_SCHEMA


@schema.parametrize()
@FAST
def test_openapi_fuzz(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server[0], headers=AUTH, excluded_checks=EXCLUDED, timeout=30)


def test_server_is_whole_after_fuzzing(fuzz_server):
    """Runs after the fuzzing (file order): no crash was logged (a stream's mid-body failure
    would not show in a status code), no upload or staging file is left, every listed adapter
    downloads, and the seeded adapter still generates."""
    url, data = fuzz_server
    assert httpx.get(url + "/ready").status_code == 200
    log = (data / "server.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
    assert list((data / "uploads").iterdir()) == []
    assert list((data / "adapters" / "staging").iterdir()) == []
    listed = httpx.get(url + "/adapters", params={"limit": 1000}, headers=AUTH).json()["adapters"]
    assert SEED in {a["adapter_id"] for a in listed}
    for record in listed:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            got = httpx.get(f"{url}/adapters/{record['adapter_id']}/files/{name}", headers=AUTH)
            assert got.status_code == 200, (record["adapter_id"], got.text)
    body = {"prompt": "t1 t2", "adapter": SEED, "max_new_tokens": 4}
    out = httpx.post(url + "/generate", json=body, headers=AUTH, timeout=30)
    assert out.status_code == 200 and out.json()["adapter"] == SEED, out.text


@pytest.mark.slow
@schema.parametrize()
@SLOW
def test_openapi_fuzz_long(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server[0], headers=AUTH, excluded_checks=EXCLUDED, timeout=30)


@pytest.mark.slow
def test_server_is_whole_after_long_fuzzing(fuzz_server):
    test_server_is_whole_after_fuzzing(fuzz_server)
