"""API keys: every route but /health and /ready needs one; scopes infer / admin."""

from __future__ import annotations

import re

import pytest
import pytest_asyncio

from server.app import create_app
from server.settings import Settings

from .conftest import adapter_files, serve, upload

pytestmark = pytest.mark.asyncio

ADMIN, INFER = "admin-key-0123456789", "infer-key-0123456789"
OPEN = {"/health", "/ready"}
INFER_ROUTES = {
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/tokenize",
    "/detokenize",
}
PATH_VALUES = {
    "adapter_id": "some-id",
    "name": "adapter_config.json",
    "model": "tiny-llama",
    "job_id": "ft-0123456789abcdef",
    "file_id": "file-0123456789abcdef01234567",
}


def _routes(app):
    """(method, template, concrete path) of every route: the API's (from the OpenAPI schema, so a
    new route is swept automatically) and FastAPI's own docs routes."""
    routes = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    routes |= {("GET", r.path) for r in app.routes if hasattr(r, "path")}
    for method, template in sorted(routes):
        yield method, template, re.sub(r"{(\w+)}", lambda m: PATH_VALUES[m.group(1)], template)


@pytest_asyncio.fixture
async def keyed(make_app):
    app = make_app(api_keys=[f"admin:{ADMIN}", f"infer:{INFER}"])
    async with serve(app) as client:
        client.app = app
        yield client


async def test_every_route_needs_a_key_except_health_and_ready(keyed):
    routes = list(_routes(keyed.app))
    assert len(routes) >= 12  # the sweep sees the API and the docs routes
    for method, template, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
            response = await keyed.request(method, path, headers=headers)
            if template in OPEN:
                assert response.status_code != 401, (method, path)
                continue
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "unauthorized"
            assert ADMIN not in response.text and INFER not in response.text


async def test_scopes(keyed, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    infer = {"Authorization": f"Bearer {INFER}"}
    for method, template, path in _routes(keyed.app):
        if template in OPEN:
            continue
        response = await keyed.request(method, path, headers=infer)
        is_infer = template in INFER_ROUTES or template.startswith(("/docs", "/openapi", "/redoc"))
        if is_infer:
            assert response.status_code != 403, (method, path)
        else:
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["type"] == "forbidden"
        assert (await keyed.request(method, path, headers=admin)).status_code not in (401, 403)

    config, weights = adapter_files(keyed.app, "lora", tmp_path / "l")
    assert (await upload(keyed, "keyed", config, weights, headers=infer)).status_code == 403
    assert (await upload(keyed, "keyed", config, weights, headers=admin)).status_code == 201
    body = {"prompt": "t1 t2", "adapter": "keyed", "max_new_tokens": 2}
    assert (await keyed.post("/generate", json=body, headers=infer)).status_code == 200
    assert (await keyed.get("/v1/models", headers=infer)).status_code == 200
    assert (await keyed.delete("/adapters/keyed", headers=infer)).status_code == 403
    assert (await keyed.delete("/adapters/keyed", headers=admin)).status_code == 200


async def test_keys_from_a_file(make_app, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\ninfer:from-file-key\n")
    async with serve(make_app(api_keys_file=keys)) as client:
        assert (await client.get("/v1/models")).status_code == 401
        response = await client.get("/v1/models", headers={"Authorization": "Bearer from-file-key"})
        assert response.status_code == 200
        assert (
            await client.get("/adapters", headers={"Authorization": "Bearer from-file-key"})
        ).status_code == 403


async def test_a_malformed_key_entry_fails_start_up_without_echoing_it(tmp_path):
    with pytest.raises(ValueError) as info:
        create_app(Settings(data_dir=tmp_path, api_keys=["root:supersecret"]))
    assert "supersecret" not in str(info.value)


async def test_without_keys_everything_is_open(client):
    assert (await client.get("/adapters")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200
