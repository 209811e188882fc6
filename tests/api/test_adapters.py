"""/adapters: upload -> generate -> delete for every family, versions, listing, downloads, PEFT
folders and upload errors."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import torch

from .conftest import FAMILY_CONFIGS, adapter_files, serve, upload
from .tiny_server import TARGETS

pytestmark = pytest.mark.asyncio

PROMPT = {"prompt": "t3 t1 t4 t1 t5", "max_new_tokens": 10}


async def _generate(client, adapter=None, **extra):
    response = await client.post("/generate", json={**PROMPT, "adapter": adapter, **extra})
    assert response.status_code == 200, response.text
    return response.json()


async def test_every_family_uploads_generates_and_deletes(client, tmp_path):
    base = await _generate(client, logprobs=True)
    changed_text, changed_logprobs = [], []
    for i, family in enumerate(FAMILY_CONFIGS):
        config, weights = adapter_files(client.app, family, tmp_path / family, seed=i)
        response = await upload(client, f"{family}-1", config, weights)
        assert response.status_code == 201, response.text
        record = response.json()
        assert record["adapter_id"] == f"{family}-1" and record["version"] == 1
        assert record["family"] == family and record["status"] == "ready" and record["error"] is None
        assert record["config"]["peft_type"] == family.upper()
        assert record["trainable_params"] > 0 and record["nbytes"] == len(weights)
        assert record["sha256"] == hashlib.sha256(weights).hexdigest()
        assert record["residency"] == ["disk"] and record["created_at"] > 0

        out = await _generate(client, f"{family}-1", logprobs=True)
        assert out["adapter"] == f"{family}-1" and out["adapter_version"] == 1
        changed_text.append(out["text"] != base["text"])
        changed_logprobs.append(out["logprobs"] != base["logprobs"])
        info = (await client.get(f"/adapters/{family}-1")).json()
        assert info["residency"][0] == "disk" and "host" in info["residency"]

        assert (await client.delete(f"/adapters/{family}-1")).status_code == 200
        assert (await client.get(f"/adapters/{family}-1")).status_code == 404
        response = await client.post("/generate", json={**PROMPT, "adapter": f"{family}-1"})
        assert response.status_code == 404
    assert all(changed_logprobs) and any(changed_text), (changed_logprobs, changed_text)
    assert await _generate(client, logprobs=True) == base  # the base model is untouched


async def test_reupload_bumps_the_version_and_serves_the_new_weights(client, tmp_path):
    cfg1, w1 = adapter_files(client.app, "lora", tmp_path / "a", seed=1)
    cfg2, w2 = adapter_files(client.app, "lora", tmp_path / "b", seed=2)
    assert (await upload(client, "mine", cfg1, w1)).json()["version"] == 1
    v1 = await _generate(client, "mine")
    response = await upload(client, "mine", cfg2, w2)
    assert response.status_code == 201 and response.json()["version"] == 2
    v2 = await _generate(client, "mine")
    assert v2["adapter_version"] == 2
    assert (await upload(client, "other", cfg2, w2)).status_code == 201
    assert v2["text"] == (await _generate(client, "other"))["text"]
    assert v1["text"] != v2["text"]
    listing = (await client.get("/adapters")).json()
    assert {a["adapter_id"]: a["version"] for a in listing["adapters"]} == {"mine": 2, "other": 1}


async def test_listing_is_paginated(client, tmp_path):
    config, weights = adapter_files(client.app, "hut", tmp_path / "h")
    for name in ("c-one", "a-one", "b-one"):
        assert (await upload(client, name, config, weights)).status_code == 201
    page = (await client.get("/adapters", params={"offset": 1, "limit": 1})).json()
    assert page["total"] == 3 and page["offset"] == 1 and page["limit"] == 1
    assert [a["adapter_id"] for a in page["adapters"]] == ["b-one"]
    everything = (await client.get("/adapters")).json()
    assert [a["adapter_id"] for a in everything["adapters"]] == ["a-one", "b-one", "c-one"]
    for params, where in (({"limit": 0}, "query.limit"), ({"offset": -1}, "query.offset")):
        response = await client.get("/adapters", params=params)
        assert response.status_code == 422 and response.json()["error"]["where"] == where


async def test_download_files(client, tmp_path):
    config, weights = adapter_files(client.app, "dct", tmp_path / "d")
    assert (await upload(client, "dl", config, weights)).status_code == 201
    response = await client.get("/adapters/dl/files/adapter_model.safetensors")
    assert response.status_code == 200 and response.content == weights
    assert response.headers["content-length"] == str(len(weights))
    response = await client.get("/adapters/dl/files/adapter_config.json")
    assert response.status_code == 200 and json.loads(response.content)["peft_type"] == "DCT"
    assert (await client.get("/adapters/dl/files/passwd")).status_code == 422
    assert (await client.get("/adapters/nope/files/adapter_config.json")).status_code == 404


async def test_peft_lora_folder_uploads_as_is_and_matches_peft(client, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import make_tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(make_tiny_llama(), config)  # same seed = same base weights
    peft_model.save_pretrained(tmp_path / "peft")
    files = tmp_path / "peft"
    response = await upload(
        client,
        "peft-lora",
        (files / "adapter_config.json").read_bytes(),
        (files / "adapter_model.safetensors").read_bytes(),
    )
    assert response.status_code == 201, response.text
    assert response.json()["family"] == "lora"

    out = await _generate(client, "peft-lora", logprobs=True)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    expected = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False
    )[0, 5:].tolist()
    assert [t["token_id"] for t in out["logprobs"]] == expected


async def test_upload_errors(client, tmp_path):
    config, weights = adapter_files(client.app, "lora", tmp_path / "l")

    async def error(adapter_id, config, weights, status=422):
        response = await upload(client, adapter_id, config, weights)
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert (await error("../escape", config, weights))["where"] == "body.adapter_id"
    assert (await error("tiny-llama", config, weights))["where"] == "body.adapter_id"
    assert (await error("garbage", config, b"\x00" * 64))["type"] == "invalid_request"
    assert (await error("cfg", b"{not json", weights))["type"] == "invalid_request"
    missing = await client.post("/adapters", data={"adapter_id": "x"}, files={"config": ("c", config)})
    assert missing.status_code == 422 and missing.json()["error"]["where"] == "body.weights"
    extra = await client.post(
        "/adapters",
        data={"adapter_id": "x", "other": "1"},
        files={"config": ("c", config), "weights": ("w", weights)},
    )
    assert extra.status_code == 422 and extra.json()["error"]["where"] == "body"
    not_multipart = await client.post("/adapters", json={"adapter_id": "x"})
    assert not_multipart.status_code == 415 and not_multipart.json()["error"]["where"] == "body"
    listing = (await client.get("/adapters")).json()
    assert listing["total"] == 0  # nothing half-stored
    assert list((client.app.state.runtime.uploads_dir).iterdir()) == []  # temp files removed


async def test_weights_over_the_cap_are_413(make_app, tmp_path):
    app = make_app(max_upload_bytes=4096)
    async with serve(app) as client:
        config, weights = adapter_files(app, "lora", tmp_path / "l")
        assert len(weights) > 4096
        response = await upload(client, "big", config, weights)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "payload_too_large"
        assert list(app.state.runtime.uploads_dir.iterdir()) == []
        # Far over the cap: refused from Content-Length before the body is read.
        response = await upload(client, "bigger", config, weights * 40)
        assert response.status_code == 413 and response.json()["error"]["where"] == "body"


@pytest.mark.parametrize("bad", ["a..b", "%00", "x" * 300, ".hidden", "-dash", "a b"])
async def test_hostile_ids_in_paths_are_422(client, bad):
    for method, path in (("GET", f"/adapters/{bad}"), ("DELETE", f"/adapters/{bad}")):
        response = await client.request(method, path)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["where"] == "path.adapter_id"


async def test_traversal_in_the_url_never_reaches_a_file(client):
    for path in (
        "/adapters/../../etc/passwd",
        "/adapters/%2e%2e%2f%2e%2e%2fetc",
        "/adapters/a/files/..%2f..%2fx",
    ):
        response = await client.get(path)
        assert response.status_code in (404, 422), path
        assert "root" not in response.text


async def test_replacing_an_adapter_below_another_in_its_slot_pool_keeps_the_engine_alive(client, tmp_path):
    """Freeing a forgotten version's device slot moves the last slot into it while the engine is
    idle (outside an inference step); that must not kill the engine thread (it once did)."""
    files = {
        name: adapter_files(client.app, "lora", tmp_path / name, seed=i + 1) for i, name in enumerate("ab")
    }
    for name, (config, weights) in files.items():
        assert (await upload(client, name, config, weights)).status_code == 201
        got = await client.post("/generate", json={"prompt": "t1", "adapter": name, "max_new_tokens": 2})
        assert got.status_code == 200, got.text
    assert (await upload(client, "a", *files["b"])).status_code == 201  # a v2: v1's slot is freed
    runtime = client.app.state.runtime
    deadline = asyncio.get_running_loop().time() + 10
    while runtime.engine.residency.tier_of(("a", 1)):
        assert asyncio.get_running_loop().time() < deadline, "a v1 never left the device"
        await asyncio.sleep(0.05)
    assert runtime.engine_alive() and (await client.get("/ready")).status_code == 200
    b = await client.post("/generate", json={"prompt": "t1 t2", "adapter": "b", "max_new_tokens": 4})
    a = await client.post("/generate", json={"prompt": "t1 t2", "adapter": "a", "max_new_tokens": 4})
    assert b.status_code == a.status_code == 200 and a.json()["text"] == b.json()["text"]  # same weights


async def test_pinning_over_http_keeps_an_adapter_resident_across_versions(client, tmp_path):
    residency = client.app.state.runtime.engine.residency
    files = {n: adapter_files(client.app, "lora", tmp_path / n, seed=i + 1) for i, n in enumerate("abc")}
    for name, (config, weights) in files.items():
        assert (await upload(client, name, config, weights)).status_code == 201
    pinned = await client.put("/adapters/a/pin")
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert (await client.put("/adapters/nope/pin")).status_code == 404
    assert (await client.put("/adapters/..%2fx/pin")).status_code in (404, 422)

    async def use(name):
        got = await client.post("/generate", json={"prompt": "t1", "adapter": name, "max_new_tokens": 1})
        assert got.status_code == 200, got.text

    await use("a")
    residency.device_bytes = 2 * residency.device_used  # room for "a" and one more: b and c take turns
    evictions = residency.stats.evictions["device"]
    for name in "bcbc":
        await use(name)
        assert "device" in (await client.get("/adapters/a")).json()["residency"]
    assert residency.stats.evictions["device"] >= evictions + 3
    assert (await upload(client, "a", *files["b"])).status_code == 201  # the pin follows new versions
    assert (await client.get("/adapters/a")).json()["pinned"] and residency.is_pinned(("a", 2))
    unpinned = await client.delete("/adapters/a/pin")
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    assert not residency.is_pinned(("a", 2))
