"""Nothing stored is lost by a race between an upload and a fine-tune that will publish the same id.

Both orders, over HTTP: an upload to an id that a queued job will store is 409 naming the job
(and the job then stores its adapter untouched); an adapter created under the id after the job
was queued, by a path that did not check, is never replaced: the job fails at publish time with
an event and keeps its result under ``<id>@<step>``. The worker thread is stopped while the race
is set up, so the job is queued by construction.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import adapter_files, serve, upload
from tests.jobs.test_api import BODY, app, wait_done  # noqa: F401 (fixture)

pytestmark = pytest.mark.asyncio


async def test_an_upload_to_a_queued_jobs_id_is_409_naming_the_job(app, tmp_path):  # noqa: F811
    async with serve(app) as client:
        runner = app.state.runtime.jobs
        runner.stop()  # the job stays queued
        job = (await client.post("/fine-tunes", json=BODY)).json()
        assert job["status"] == "queued"
        config, weights = adapter_files(app, "hut", tmp_path / "hut")
        refused = await upload(client, "tuned", config, weights)
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert job["id"] in error["message"] and error["where"] == "body.adapter_id"
        assert (await client.get("/adapters/tuned")).status_code == 404
        other = await upload(client, "unrelated", config, weights)
        assert other.status_code == 201, other.text  # only the job's ids are refused

        runner.start()
        done = await wait_done(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        stored = (await client.get("/adapters/tuned")).json()
        assert stored["family"] == "lora" and stored["version"] == done["result"]["version"] == 1
        # Once the job is over, the id is an ordinary adapter again: a new version may be uploaded.
        assert (await upload(client, "tuned", config, weights)).status_code == 201


async def test_an_adapter_created_after_the_job_was_queued_is_not_replaced(app, tmp_path):  # noqa: F811
    async with serve(app) as client:
        runner = app.state.runtime.jobs
        runner.stop()
        job = (await client.post("/fine-tunes", json=BODY)).json()
        # The other order through HTTP: the id exists first, so the fine-tune is refused at submit.
        config, weights = adapter_files(app, "hut", tmp_path / "hut")
        assert (await upload(client, "taken", config, weights)).status_code == 201
        late = await client.post("/fine-tunes", json={**BODY, "adapter_id": "taken"})
        assert late.status_code == 422 and late.json()["error"]["where"] == "body.adapter_id"
        # A write that checked nothing (another process, a race inside the window): the job's id
        # appears after it was queued.
        placed = app.state.runtime.store.put("tuned", config, weights)

        runner.start()
        done = await wait_done(client, job["id"])
        assert done["status"] == "failed"
        assert "'tuned' was created" in done["error"] and "tuned@3" in done["error"], done["error"]
        events = (await client.get(f"/fine-tunes/{job['id']}/events")).json()["events"]
        refused = [e for e in events if e["type"] == "publish_refused"]
        assert len(refused) == 1 and refused[0]["data"]["version"] == placed.version
        assert events[-1]["type"] == "failed"
        kept = (await client.get("/adapters/tuned")).json()
        assert kept["family"] == "hut" and kept["version"] == placed.version  # left alone
        rescued = (await client.get("/adapters/tuned@3")).json()
        assert rescued["family"] == "lora"  # the training is not lost either
