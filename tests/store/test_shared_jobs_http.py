"""Two tiny-model apps ("replicas") on one store, through HTTP: a training file uploaded through
one is listed and read through the other, a fine-tune submitted through the other (with that
file) is seen by both, trained once by whichever replica claims it, and its adapter is served by
both at once; a file deleted through one is gone on both.

Two set-ups: the embedded store (local files + SQLite, the two apps on one ``data_dir``, as
``make serve-cluster`` runs on one machine) and S3 + PostgreSQL (one ``data_dir`` each)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import pytest

from tests.api.conftest import serve
from tests.jobs.test_api import BODY, RECORDS, wait_done

from . import backend_servers as servers
from .test_shared_store_http import PROMPT, replica

pytestmark = pytest.mark.asyncio
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


@pytest.fixture(params=["embedded", "s3-postgres"])
def data_dirs_and_store(request, tmp_path):
    if request.param == "embedded":
        return (tmp_path / "one", tmp_path / "one"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    shared = {
        "store_blob_url": f"s3://{servers.new_bucket(endpoint)}/facet",
        "store_s3_endpoint": endpoint,
        "store_index_url": servers.new_database(request.getfixturevalue("pg_server")),
    }
    return (tmp_path / "a", tmp_path / "b"), shared


async def test_files_and_fine_tunes_are_shared_by_two_replicas(data_dirs_and_store):
    (dir_a, dir_b), shared = data_dirs_and_store
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(serve(replica(dir_a, shared)))
        b = await stack.enter_async_context(serve(replica(dir_b, shared)))
        form = {"files": {"file": ("train.jsonl", JSONL)}, "data": {"purpose": "fine-tune"}}
        uploaded = await a.post("/files", **form)
        assert uploaded.status_code == 201, uploaded.text
        file = uploaded.json()
        assert (await b.get(f"/files/{file['id']}")).json() == file
        assert (await b.get(f"/files/{file['id']}/content")).content == JSONL
        assert [f["id"] for f in (await b.get("/files")).json()["data"]] == [file["id"]]

        body = {k: v for k, v in BODY.items() if k not in ("training_data", "validation_data")}
        created = await b.post("/fine-tunes", json={**body, "training_file": file["id"]})
        assert created.status_code == 202, created.text
        job = created.json()
        done = await wait_done(a, job["id"])  # followed through the replica it was not sent to
        assert done["status"] == "succeeded", done["error"]
        assert done["n_train"] == len(RECORDS) and done["result"]["version"] == 1
        for client in (a, b):
            listing = (await client.get("/fine-tunes")).json()
            assert [j["id"] for j in listing["jobs"]] == [job["id"]]
            out = await client.post("/generate", json={**PROMPT, "adapter": "tuned"})
            assert out.status_code == 200 and out.json()["adapter_version"] == 1, out.text
        events = (await a.get(f"/fine-tunes/{job['id']}/events")).json()["events"]
        assert [e["type"] for e in events].count("started") == 1  # trained once

        assert (await b.delete(f"/files/{file['id']}")).status_code == 200
        for client in (a, b):
            assert (await client.get(f"/files/{file['id']}")).status_code == 404
