"""The client package lives in clients/python (its own project): import it from the checkout."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import create_app
from server.engine.loader import wrap_model
from tests.api.conftest import adapter_files
from tests.api.processes import server_thread
from tests.api.tiny_server import TARGETS, build_tiny, tiny_settings
from tests.conftest import make_tiny_llama, make_tokenizer

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python"
if str(CLIENT_SRC) not in sys.path:
    sys.path.insert(0, str(CLIENT_SRC))

ADMIN, INFER = "client-admin-key", "client-infer-key"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    """A tiny-model app under uvicorn (a thread of this process), with an admin and an infer key."""
    settings = tiny_settings(
        data_dir=tmp_path_factory.mktemp("client-server"), api_keys=[f"admin:{ADMIN}", f"infer:{INFER}"]
    )
    engine, store = build_tiny(settings)
    with server_thread(create_app(settings, engine=engine, store=store)) as url:
        yield url


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    """A random LoRA adapter folder for the tiny model (adapter_config.json + weights)."""
    base = wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)
    folder = tmp_path_factory.mktemp("adapters") / "my-lora"
    adapter_files(base, "lora", folder)
    return folder
