"""Fixtures for the API tests: a tiny-model app in-process (httpx ASGITransport), adapter files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from server.app import create_app
from tests.engine.helpers import random_adapter

from .tiny_server import build_tiny, tiny_settings

# One small config per family, sized for the tiny Llama (hidden 32, kv 16, mlp 64).
FAMILY_CONFIGS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "hut": {"r": 3},
    "ether": {"variant": "etherplus", "side": "in", "n_blocks": 2},
    "dct": {"n_frequency": 20, "scaling": 2.0},
    "surm": {"variant": "circulant", "alpha": 1.5},
}


async def wait_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.get("/ready")
        if response.status_code == 200:
            return
        assert asyncio.get_running_loop().time() < deadline, response.text
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serve(app, *, headers: dict | None = None, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and yield a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://facet.test", headers=headers, timeout=60
        ) as client:
            if ready:
                await wait_ready(client)
            yield client


@pytest.fixture
def make_app(tmp_path) -> Callable:
    """``make_app(**settings)`` -> a tiny-model app with a fresh store under ``tmp_path``."""

    def make(**overrides):
        settings = tiny_settings(data_dir=tmp_path / "data", **overrides)
        engine, store = build_tiny(settings)
        return create_app(settings, engine=engine, store=store)

    return make


@pytest_asyncio.fixture
async def client(make_app) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app()
    async with serve(app) as c:
        c.app = app  # tests reach the runtime through it
        yield c


def adapter_files(app_or_base, family: str, folder: Path, seed: int = 0) -> tuple[bytes, bytes]:
    """Random non-zero adapter of ``family`` for an app's (or a ``BaseModel``'s) base model:
    (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    base = app_or_base.state.runtime.engine.base if hasattr(app_or_base, "state") else app_or_base
    shapes = base.module_shapes
    weights = {p: m.base.weight for p, m in base.modules.items()}
    adapter = random_adapter(family, FAMILY_CONFIGS[family], shapes, weights, seed=seed)
    adapter.save(folder)
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


async def upload(client: httpx.AsyncClient, adapter_id: str, config: bytes, weights: bytes, **kw):
    files = {
        "config": ("adapter_config.json", config, "application/json"),
        "weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
    }
    return await client.post("/adapters", data={"adapter_id": adapter_id}, files=files, **kw)


def parse_sse(text: str) -> list[tuple[str | None, str]]:
    """``[(event name or None, data)]`` of a text/event-stream body."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


def sse_json(text: str) -> list[tuple[str | None, dict | str]]:
    return [(n, d if d == "[DONE]" else json.loads(d)) for n, d in parse_sse(text)]


# ----------------------------------------------------------------- a real tiny server (subprocess)

ADMIN_KEY, INFER_KEY = "test-admin-key", "test-infer-key"


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory) -> Iterator[str]:
    """``python -m tests.api.tiny_server`` on a free loopback port, with an admin and an infer key."""
    from .processes import server_process

    data = tmp_path_factory.mktemp("tiny-server")
    args = ["--data-dir", str(data), "--api-keys", f"admin:{ADMIN_KEY}", f"infer:{INFER_KEY}"]
    with server_process("tests.api.tiny_server", args, data / "server.log") as url:
        yield url
