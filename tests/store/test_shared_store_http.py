"""Two app instances ("replicas", each with its own data_dir and engine) on one shared store in S3
and PostgreSQL, built by ``server.app.open_store`` from the settings: an upload through one is
served and downloadable by the other, a re-upload through the other is served at its new version
by both, a delete through one is a 404 on both."""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack

import pytest
import torch

from server.app import create_app, open_store
from server.engine.engine import Engine
from server.engine.loader import wrap_model
from tests.api.conftest import adapter_files, serve, upload
from tests.api.tiny_server import BASE_NAME, CHAT_TEMPLATE, TARGETS, tiny_settings
from tests.conftest import make_tiny_llama, make_tokenizer

from . import backend_servers as servers

pytestmark = pytest.mark.asyncio
PROMPT = {"prompt": "t3 t1 t4", "max_new_tokens": 4}


def replica(data_dir, store_settings: dict):
    """A tiny-model app whose store comes from the settings (as ``make serve`` builds it)."""
    # cpu_kernels off: the store is under test, not the kernels (no wait on their build lock)
    settings = tiny_settings(data_dir=data_dir, cpu_kernels=False, **store_settings)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)  # both replicas hold the same base weights
    base = wrap_model(BASE_NAME, make_tiny_llama(), tokenizer, TARGETS)
    store = open_store(settings, base)
    engine = Engine(
        base, settings, source=lambda key: store.load(*key), current_version=store.current_version
    )
    return create_app(settings, engine=engine, store=store)


async def test_two_replicas_serve_one_shared_store(tmp_path, s3_endpoint, pg_server):
    shared = {
        "store_blob_url": f"s3://{servers.new_bucket(s3_endpoint)}/facet",
        "store_s3_endpoint": s3_endpoint,
        "store_index_url": servers.new_database(pg_server),
    }
    app_a, app_b = replica(tmp_path / "a", shared), replica(tmp_path / "b", shared)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(serve(app_a))
        b = await stack.enter_async_context(serve(app_b))
        cfg1, w1 = adapter_files(app_a, "lora", tmp_path / "w1", seed=1)
        cfg2, w2 = adapter_files(app_a, "hut", tmp_path / "w2", seed=2)

        assert (await upload(a, "shared", cfg1, w1)).status_code == 201
        out_b = await b.post("/generate", json={**PROMPT, "adapter": "shared"})
        assert out_b.status_code == 200 and out_b.json()["adapter_version"] == 1, out_b.text
        download = await b.get("/adapters/shared/files/adapter_model.safetensors")
        assert download.status_code == 200 and hashlib.sha256(download.content).digest() == (
            hashlib.sha256(w1).digest()
        )

        assert (await upload(b, "shared", cfg2, w2)).json()["version"] == 2
        for client in (a, b):
            out = await client.post("/generate", json={**PROMPT, "adapter": "shared"})
            assert out.status_code == 200 and out.json()["adapter_version"] == 2, out.text
            assert (await client.get("/adapters/shared")).json()["family"] == "hut"

        assert (await a.delete("/adapters/shared")).status_code == 200
        for client in (a, b):
            assert (await client.post("/generate", json={**PROMPT, "adapter": "shared"})).status_code == 404
            assert (await client.get("/adapters")).json()["adapters"] == []
