"""``/files`` and ``training_file``: uploaded JSONL is checked line by line, stored whole, listed,
used by fine-tune jobs by id, and deleted; bad uploads get a 4xx naming the problem."""

from __future__ import annotations

import json

import pytest

from adapters_store import Conflict, Corrupt
from server.jobs.files import FileInvalid, FileNotFound, FileStore, object_key
from tests.api.conftest import serve
from tests.jobs.test_api import BODY, RECORDS, app, wait_done  # noqa: F401 (fixture)

JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


def object_keys(files: FileStore) -> set[str]:
    return {i.key for i in files.objects.blobs.list("files/")}


def test_file_store_round_trip_tombstone_and_orphans(tmp_path):
    files = FileStore(tmp_path)
    info = files.put("train.jsonl", "fine-tune", JSONL)
    assert info["id"].startswith("file-") and info["bytes"] == len(JSONL) and info["records"] == 4
    assert files.get(info["id"]) == info and files.text(info["id"]).encode() == JSONL
    assert object_keys(files) == {object_key(info["id"])}
    with pytest.raises(Conflict):  # immutable keys: a second create of one key is refused
        files.objects.put(object_key(info["id"]), b"other")
    orphan = object_key("file-000000000000000000000000")
    files.objects.put(orphan, b"half")  # an upload that died between its object and its row
    again = FileStore(tmp_path)
    assert [i["id"] for i in again.list()] == [info["id"]]
    assert object_keys(again) == {object_key(info["id"])}  # the orphan is collected at open
    again.delete(info["id"])
    assert again.list() == [] and object_keys(again) == set()
    with again.db.transaction() as cur:
        assert cur.execute("SELECT id FROM training_file_tombstones").fetchall() == [{"id": info["id"]}]
    for bad in ("../etc/passwd", "file-xyz", info["id"]):
        with pytest.raises(FileNotFound):
            again.get(bad)


def test_a_damaged_file_is_refused_not_served(tmp_path):
    files = FileStore(tmp_path)
    info = files.put("train.jsonl", "fine-tune", JSONL)
    path = files.objects.blobs.local_path(object_key(info["id"]))
    path.write_bytes(JSONL[:-2] + b"X\n")  # same size, other bytes
    with pytest.raises(Corrupt) as exc:
        files.text(info["id"])
    assert exc.value.status == 409 and "checksum" in exc.value.message


def test_files_of_the_earlier_layout_are_moved_into_the_store(tmp_path):
    legacy = {"id": "file-" + "ab" * 12, "object": "file", "bytes": len(JSONL), "created_at": 1}
    legacy |= {"filename": "old.jsonl", "purpose": "fine-tune", "records": 4}
    (tmp_path / f"{legacy['id']}.jsonl").write_bytes(JSONL)
    (tmp_path / f"{legacy['id']}.json").write_text(json.dumps(legacy))
    (tmp_path / "file-000000000000000000000000.jsonl").write_bytes(b"half")  # no metadata: a leftover
    files = FileStore(tmp_path)
    assert files.list() == [legacy] and files.text(legacy["id"]).encode() == JSONL
    assert list(tmp_path.glob("file-*")) == []


@pytest.mark.parametrize(
    "data, purpose, where, needle",
    [
        (JSONL + b"{oops\n", "fine-tune", "file", "line 5: invalid JSON"),
        (b'{"prompt": "a"}\n', "fine-tune", "file", "line 1"),
        (b"\xff\xfe", "fine-tune", "file", "not UTF-8"),
        (JSONL + b'{"prompt": "a", "completion": "\\ud800"}\n', "fine-tune", "file", 'line 5: "complet'),
        (b"", "fine-tune", "file", "no examples"),
        (JSONL, "assistants", "purpose", "fine-tune"),
    ],
)
def test_file_store_refuses_bad_uploads(tmp_path, data, purpose, where, needle):
    files = FileStore(tmp_path)
    with pytest.raises(FileInvalid) as exc:
        files.put("x.jsonl", purpose, data)
    assert exc.value.where == where and needle in exc.value.message
    assert files.list() == [] and object_keys(files) == set()


def upload(client, data: bytes = JSONL, purpose: str = "fine-tune"):
    return client.post("/files", files={"file": ("train.jsonl", data)}, data={"purpose": purpose})


@pytest.mark.asyncio
async def test_a_job_trains_from_uploaded_files(app):  # noqa: F811
    async with serve(app) as client:
        response = await upload(client)
        assert response.status_code == 201, response.text
        file = response.json()
        assert file["object"] == "file" and file["filename"] == "train.jsonl" and file["records"] == 4
        assert (await client.get(f"/files/{file['id']}")).json() == file
        assert (await client.get(f"/files/{file['id']}/content")).content == JSONL
        assert [f["id"] for f in (await client.get("/files")).json()["data"]] == [file["id"]]

        body = {k: v for k, v in BODY.items() if k not in ("training_data", "validation_data")}
        body |= {"training_file": file["id"], "validation_file": file["id"]}
        job = (await client.post("/fine-tunes", json=body)).json()
        done = await wait_done(client, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["n_train"] == 4 and done["result"]["val_loss_after"] is not None

        deleted = await client.delete(f"/files/{file['id']}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert (await client.get(f"/files/{file['id']}")).status_code == 404
        assert (await client.get(f"/fine-tunes/{job['id']}")).json()["status"] == "succeeded"


@pytest.mark.parametrize(
    "change, where, needle",
    [
        ({"training_file": "file-0123456789abcdef01234567"}, "body.training_file", "no file"),
        ({"validation_file": "nope"}, "body.validation_file", "no file"),
        ({"training_data": None}, "body", "exactly one of training_data and training_file"),
        ({"training_file": "file-x"}, "body", "exactly one"),  # both given
        ({"validation_file": "file-x"}, "body", "at most one"),  # both given
    ],
)
@pytest.mark.asyncio
async def test_bad_file_references_are_422(app, change, where, needle):  # noqa: F811
    async with serve(app) as client:
        body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
        if where != "body" and "training_file" in change:
            body.pop("training_data")
        if where != "body" and "validation_file" in change:
            body.pop("validation_data")
        response = await client.post("/fine-tunes", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["where"].startswith(where) and needle in error["message"], error
        assert (await client.get("/fine-tunes")).json()["total"] == 0


@pytest.mark.asyncio
async def test_a_file_whose_records_do_not_tokenize_names_the_file_field(app):  # noqa: F811
    async with serve(app) as client:
        long_prompt = {"prompt": " ".join(["t1"] * 40), "completion": "t2"}
        file = (await upload(client, json.dumps(long_prompt).encode())).json()
        body = {k: v for k, v in BODY.items() if k != "training_data"} | {"training_file": file["id"]}
        body["hyperparameters"] = {**body["hyperparameters"], "max_length": 8}
        error = (await client.post("/fine-tunes", json=body)).json()["error"]
        assert error["where"] == "body.training_file" and "line 1" in error["message"]


@pytest.mark.parametrize(
    "kwargs, status, needle",
    [
        ({"data": JSONL + b"not json\n"}, 422, "line 5"),
        ({"purpose": "batch"}, 422, "purpose"),
        ({"data": b"x" * (2 << 20)}, 413, "exceeds"),
    ],
)
@pytest.mark.asyncio
async def test_bad_uploads(tmp_path, kwargs, status, needle):
    from server.app import create_app
    from tests.api.tiny_server import build_tiny, tiny_settings

    settings = tiny_settings(data_dir=tmp_path / "data", max_file_bytes=1 << 20)
    engine, store = build_tiny(settings)
    async with serve(create_app(settings, engine=engine, store=store)) as client:
        response = await upload(client, **kwargs)
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]
        assert (await client.get("/files")).json()["data"] == []
        missing = await client.post("/files", files={"file": ("a.jsonl", JSONL)})
        assert missing.status_code == 422 and missing.json()["error"]["where"] == "body.purpose"
    assert list((tmp_path / "data" / "adapters" / "files").glob("*")) == []
