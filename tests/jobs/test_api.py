"""``/fine-tunes`` end to end on the tiny-model app: 202, 422 before work, progress, serving the result."""

from __future__ import annotations

import asyncio

import pytest

from server.app import create_app
from tests.api.conftest import serve
from tests.api.tiny_server import build_tiny, tiny_settings

pytestmark = pytest.mark.asyncio

RECORDS = [{"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"} for i in range(4)]
BODY = {
    "adapter_id": "tuned",
    "method": "lora",
    "method_config": {"r": 2},
    "hyperparameters": {"max_steps": 3, "batch_size": 2, "learning_rate": 0.01},
    "training_data": RECORDS,
    "validation_data": RECORDS,
}


@pytest.fixture
def app(tmp_path):
    settings = tiny_settings(data_dir=tmp_path / "data")
    engine, store = build_tiny(settings)
    return create_app(settings, engine=engine, store=store)


async def wait_done(client, job_id: str, timeout: float = 30.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        job = (await client.get(f"/fine-tunes/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert loop.time() < deadline, job
        await asyncio.sleep(0.05)


async def test_a_fine_tune_trains_stores_and_serves_the_adapter(app):
    async with serve(app) as client:
        response = await client.post("/fine-tunes", json=BODY)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] in ("queued", "running", "succeeded") and job["adapter_id"] == "tuned"
        done = await wait_done(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["steps"] == 3

        events = (await client.get(f"/fine-tunes/{job['id']}/events")).json()["events"]
        assert [e["type"] for e in events][:2] == ["created", "started"]
        assert events[-1]["type"] == "succeeded"
        later = (await client.get(f"/fine-tunes/{job['id']}/events", params={"after": 2})).json()["events"]
        assert later[0]["seq"] == 3

        listing = (await client.get("/fine-tunes")).json()
        assert listing["total"] == 1 and listing["jobs"][0]["id"] == job["id"]
        assert (await client.get("/adapters/tuned")).json()["family"] == "lora"
        gen = await client.post(
            "/generate", json={"prompt": "t1 t10", "adapter": "tuned", "max_new_tokens": 2}
        )
        assert gen.status_code == 200, gen.text

        cancel = await client.post(f"/fine-tunes/{job['id']}/cancel")
        assert cancel.status_code == 409
        assert (await client.get("/fine-tunes/ft-nope")).status_code == 404
        assert (await client.get("/fine-tunes/ft-nope/events")).status_code == 404


@pytest.mark.parametrize(
    "change, where, needle",
    [
        (
            {"training_data": '{"prompt": "t1", "completion": "t2"}\nnot json\n'},
            "body.training_data",
            "line 2",
        ),
        ({"method": "nope"}, "body.method", "unknown adapter family"),
        ({"method_config": {"r": 0}}, "body.method_config.r", ""),
        ({"hyperparameters": {"batch_size": 0}}, "body.hyperparameters.batch_size", ""),
        ({"adapter_id": "../x"}, "body.adapter_id", ""),
    ],
)
async def test_invalid_requests_get_422_and_queue_nothing(app, change, where, needle):
    async with serve(app) as client:
        response = await client.post("/fine-tunes", json={**BODY, **change})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["where"] == where and needle in error["message"]
        assert (await client.get("/fine-tunes")).json()["total"] == 0


async def test_missing_fields_are_422(app):
    async with serve(app) as client:
        response = await client.post("/fine-tunes", json={"adapter_id": "x", "method": "lora"})
        assert response.status_code == 422


async def test_serving_is_unaffected_while_a_job_trains_and_a_running_job_can_be_cancelled(app):
    async with serve(app) as client:
        gen = {"prompt": "t1 t10 t20", "max_new_tokens": 6}
        baseline = (await client.post("/generate", json=gen)).json()["text"]
        body = {**BODY, "adapter_id": "long", "hyperparameters": {"max_steps": 100000, "batch_size": 1}}
        job = (await client.post("/fine-tunes", json=body)).json()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await client.get(f"/fine-tunes/{job['id']}")).json()["step"] < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        for _ in range(3):  # the training thread's binding never leaks into serving
            assert (await client.post("/generate", json=gen)).json()["text"] == baseline
        cancel = await client.post(f"/fine-tunes/{job['id']}/cancel")
        assert cancel.status_code == 200
        done = await wait_done(client, job["id"])
        assert done["status"] == "cancelled" and 2 <= done["step"] < 100000
        assert (await client.get("/adapters/long")).status_code == 404


async def test_after_a_restart_no_job_stays_running_even_before_any_fine_tune_request(tmp_path):
    """A job the previous process left ``running`` is failed as soon as the server is ready."""
    import json

    from server.jobs.runner import JobRunner, JobSpec

    settings = tiny_settings(data_dir=tmp_path / "data")
    engine, store = build_tiny(settings)
    previous = JobRunner(engine.base, store, settings.data_dir / "jobs")
    jsonl = "".join(json.dumps(r) + "\n" for r in RECORDS)
    job = previous.submit(JobSpec(adapter_id="tuned", method="lora", training_data=jsonl, config={"r": 2}))
    previous.db.update(job["id"], status="running")  # as if the process died mid-job
    app = create_app(settings, engine=engine, store=store)
    async with serve(app) as client:
        assert app.state.runtime.jobs is not None  # created at start, not on first use
        got = (await client.get(f"/fine-tunes/{job['id']}")).json()
        assert got["status"] == "failed" and "interrupted" in got["error"]
