"""``POST /fine-tunes`` is retry-safe with an ``Idempotency-Key`` and bounded by a queue cap."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.conftest import serve
from tests.jobs.test_api import BODY, app  # noqa: F401 (fixture)

pytestmark = pytest.mark.asyncio


def stopped_runner(app):  # noqa: F811
    """Jobs stay queued: the worker thread is stopped (the app created it at start-up)."""
    runner = app.state.runtime.jobs
    runner.stop()
    return runner


async def test_the_same_key_and_body_give_the_same_job(app):  # noqa: F811
    async with serve(app) as client:
        stopped_runner(app)
        key = {"Idempotency-Key": "train-42"}
        first = await client.post("/fine-tunes", json=BODY, headers=key)
        again = await client.post("/fine-tunes", json=BODY, headers=key)
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert (
            again.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first.headers
        )
        # Retries racing each other still make one job.
        racing = await asyncio.gather(
            *(
                client.post(
                    "/fine-tunes", json={**BODY, "adapter_id": "raced"}, headers={"Idempotency-Key": "r"}
                )
                for _ in range(6)
            )
        )
        assert {r.status_code for r in racing} == {202} and len({r.json()["id"] for r in racing}) == 1
        assert (await client.get("/fine-tunes")).json()["total"] == 2
        # Without a key the same body again is refused: its adapter id is taken by the queued job.
        again = await client.post("/fine-tunes", json=BODY)
        assert again.status_code == 422 and again.json()["error"]["where"] == "body.adapter_id"


async def test_the_same_key_with_another_body_is_422(app):  # noqa: F811
    async with serve(app) as client:
        stopped_runner(app)
        key = {"Idempotency-Key": "k1"}
        assert (await client.post("/fine-tunes", json=BODY, headers=key)).status_code == 202
        other = await client.post("/fine-tunes", json={**BODY, "adapter_id": "other"}, headers=key)
        assert other.status_code == 422
        assert other.json()["error"]["where"] == "header.Idempotency-Key"
        assert (await client.get("/fine-tunes")).json()["total"] == 1
        too_long = await client.post("/fine-tunes", json=BODY, headers={"Idempotency-Key": "k" * 300})
        assert too_long.status_code == 422


async def test_a_full_queue_is_429_with_retry_after(app):  # noqa: F811
    async with serve(app) as client:
        runner = stopped_runner(app)
        runner.max_queued = 2
        for i in range(2):
            assert (await client.post("/fine-tunes", json={**BODY, "adapter_id": f"q{i}"})).status_code == 202
        full = await client.post("/fine-tunes", json={**BODY, "adapter_id": "q2"})
        assert full.status_code == 429 and full.headers["Retry-After"]
        assert "queued" in full.json()["error"]["message"]
        job = (await client.get("/fine-tunes")).json()["jobs"][0]
        assert (await client.post(f"/fine-tunes/{job['id']}/cancel")).status_code == 200
        assert (await client.post("/fine-tunes", json={**BODY, "adapter_id": "q3"})).status_code == 202
