"""facet_client: Client against a real uvicorn tiny server, AsyncClient over ASGI, the CLI."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from server.app import create_app
from tests.api.conftest import serve
from tests.api.processes import free_port
from tests.api.tiny_server import build_tiny, tiny_settings

from .conftest import ADMIN, INFER

facet_client = pytest.importorskip("facet_client")
from facet_client import (  # noqa: E402
    AsyncClient,
    AuthenticationError,
    Client,
    FacetConnectionError,
    FacetError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from facet_client.cli import main as cli  # noqa: E402


def test_sync_client_generate_stream_adapters_and_errors(server_url, adapter_folder):
    with Client(server_url, api_key=ADMIN) as facet:
        assert facet.ready()["status"] == "ready"
        info = facet.adapters.upload(adapter_folder)
        assert (info.adapter_id, info.version, info.family) == ("my-lora", 1, "lora")
        assert facet.adapters.get("my-lora").residency[0] == "disk"
        page = facet.adapters.list()
        assert "my-lora" in [a.adapter_id for a in page.adapters] and page.total >= 1

        out = facet.generate("t1 t2 t3", adapter="my-lora", max_new_tokens=4)
        assert out.adapter == "my-lora" and out.adapter_version == 1
        assert out.usage == {"prompt_tokens": 3, "completion_tokens": 4}
        assert out.finish_reason == "length"

        stream = facet.generate_stream("t1 t2 t3", adapter="my-lora", max_new_tokens=4)
        tokens = list(stream)
        assert len(tokens) == 4
        assert "".join(t.text for t in tokens) == stream.result.text == out.text

        with pytest.raises(NotFoundError) as info_404:
            facet.generate("t1", adapter="no-such-adapter")
        e = info_404.value
        assert (e.status, e.type, e.where) == (404, "not_found", "body.adapter")
        assert e.message == "no adapter with this id"

        with pytest.raises(ValidationError) as info_422:
            facet.generate("t1", max_new_tokens=-1)
        assert info_422.value.status == 422 and info_422.value.where == "body.max_new_tokens"

        with pytest.raises(NotFoundError):  # a streamed request fails before its first event
            list(facet.generate_stream("t1", adapter="no-such-adapter"))

        deleted = facet.adapters.delete("my-lora")
        assert deleted.adapter_id == "my-lora"
        with pytest.raises(NotFoundError):
            facet.adapters.get("my-lora")

    with Client(server_url, api_key=INFER) as infer:
        assert infer.generate("t1", max_new_tokens=1).completion_tokens == 1
        with pytest.raises(PermissionDeniedError) as info_403:
            infer.adapters.list()
        assert info_403.value.type == "forbidden" and "admin" in info_403.value.message
    with Client(server_url) as anonymous, pytest.raises(AuthenticationError) as info_401:
        anonymous.generate("t1")
    assert info_401.value.status == 401 and isinstance(info_401.value, FacetError)

    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as nobody, pytest.raises(FacetConnectionError):
        nobody.health()


@pytest.mark.asyncio
async def test_async_client_over_asgi(tmp_path, adapter_folder):
    settings = tiny_settings(data_dir=tmp_path / "data")
    engine, store = build_tiny(settings)
    app = create_app(settings, engine=engine, store=store)
    async with serve(app):  # runs the lifespan; the client below brings its own transport
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://facet.test", transport=transport) as facet:
            assert (await facet.health()) == {"status": "ok"}
            info = await facet.adapters.upload(adapter_folder, adapter_id="async-lora")
            assert info.adapter_id == "async-lora"
            assert [a.adapter_id for a in (await facet.adapters.list()).adapters] == ["async-lora"]
            out = await facet.generate(messages=[{"role": "user", "content": "t4 t5"}], max_new_tokens=3)
            assert out.completion_tokens == 3

            stream = facet.generate_stream("t1 t2", adapter="async-lora", max_new_tokens=3, logprobs=True)
            tokens = [t async for t in stream]
            assert len(tokens) == 3 and all(t.logprob is not None for t in tokens)
            assert stream.result.text == "".join(t.text for t in tokens)

            with pytest.raises(NotFoundError) as info:
                await facet.generate("t1", adapter="missing")
            assert info.value.where == "body.adapter"
            with pytest.raises(ValidationError):
                await facet.generate("t1", top_p=2.0)
            await facet.adapters.delete("async-lora")
            with pytest.raises(NotFoundError):
                await facet.adapters.delete("async-lora")
    async with AsyncClient() as nobody:
        with pytest.raises(ValueError):  # neither prompt nor messages: refused before any I/O
            await nobody.generate()


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli(server_url, adapter_folder):
    admin = ["--url", server_url, "--api-key", ADMIN]
    code, out, err = _run(*admin, "adapters", "upload", str(adapter_folder), "--id", "cli-lora")
    assert code == 0, err
    assert out.startswith("cli-lora\tv1\tlora\tready")

    code, out, _ = _run(*admin, "--json", "adapters", "list")
    assert code == 0 and "cli-lora" in [a["adapter_id"] for a in json.loads(out)["adapters"]]

    code, out, _ = _run(*admin, "generate", "t1 t2", "--adapter", "cli-lora", "--max-new-tokens", "3")
    assert code == 0 and out.endswith("\n")
    code, out, _ = _run(*admin, "--json", "generate", "t1 t2", "--max-new-tokens", "3")
    assert code == 0 and json.loads(out)["usage"]["completion_tokens"] == 3
    code, out, _ = _run(*admin, "--json", "generate", "t1 t2", "--max-new-tokens", "3", "--stream")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 4 and lines[-1]["finish_reason"] == "length"

    code, out, err = _run(*admin, "generate", "t1", "--adapter", "nope")
    assert (
        code == 1 and out == "" and err == "facet: 404 not_found: no adapter with this id (at body.adapter)\n"
    )
    code, _, err = _run(*admin, "--json", "adapters", "rm", "nope")
    assert code == 1 and json.loads(err)["error"]["status"] == 404

    code, out, _ = _run(*admin, "adapters", "rm", "cli-lora")
    assert code == 0 and out.startswith("cli-lora\tv1")
    code, _, err = _run("--url", server_url, "--api-key", INFER, "adapters", "list")
    assert code == 1 and "403 forbidden" in err


def test_facet_serve_delegates_to_the_server_entry_point(monkeypatch):
    from facet_client.cli import main

    import server.__main__ as server_main

    seen = []
    monkeypatch.setattr(server_main, "main", lambda argv: seen.append(argv) or 0)
    assert main(["serve", "--port", "8123", "--max-batch-size", "8"]) == 0
    assert seen == [["--port", "8123", "--max-batch-size", "8"]]
