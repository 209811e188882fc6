"""facet_client ``files`` and fine-tunes from files: Client / AsyncClient / CLI against a real
uvicorn tiny-model server whose ``max_file_bytes`` is small (4 KiB), so the 413 is real too."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from server.app import create_app
from tests.api.processes import server_thread
from tests.api.tiny_server import build_tiny, tiny_settings

from .conftest import ADMIN

facet_client = pytest.importorskip("facet_client")
from facet_client import (  # noqa: E402
    AsyncClient,
    BadRequestError,
    Client,
    NotFoundError,
    TrainingFile,
    ValidationError,
)
from facet_client._ops import is_file_id  # noqa: E402
from facet_client.cli import main as cli  # noqa: E402

RECORDS = [{"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"} for i in range(4)]
JSONL = "".join(json.dumps(r) + "\n" for r in RECORDS)
HP = {"max_steps": 2, "batch_size": 2, "learning_rate": 0.01}
MAX_FILE_BYTES = 4096


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    settings = tiny_settings(
        data_dir=tmp_path_factory.mktemp("files-server"),
        api_keys=[f"admin:{ADMIN}"],
        max_file_bytes=MAX_FILE_BYTES,
    )
    engine, store = build_tiny(settings)
    with server_thread(create_app(settings, engine=engine, store=store)) as url:
        yield url


@pytest.fixture
def train_path(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(JSONL)
    return path


def file_ids(facet: Client) -> list[str]:
    return [f.id for f in facet.files.list()]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_files_round_trip(url, train_path):
    with Client(url, api_key=ADMIN) as facet:
        seen: list[int] = []
        file = facet.files.create(train_path, progress=seen.append)
        assert isinstance(file, TrainingFile) and file.id.startswith("file-") and sum(seen) == len(JSONL)
        assert (file.filename, file.purpose, file.records, file.bytes) == (
            "train.jsonl",
            "fine-tune",
            4,
            len(JSONL),
        )
        assert file.raw["object"] == "file" and file.created_at > 0
        assert facet.files.get(file.id) == file
        assert facet.files.content(file.id) == JSONL

        inline = facet.files.create(JSONL[: JSONL.index("\n") + 1].encode(), filename="one.jsonl")
        assert (inline.filename, inline.records) == ("one.jsonl", 1)
        assert {inline.id, file.id} <= set(file_ids(facet))

        gone = facet.files.delete(file.id)
        assert (gone.id, gone.filename, gone.deleted) == (file.id, "train.jsonl", True)
        assert file.id not in file_ids(facet) and inline.id in file_ids(facet)
        for call in (facet.files.get, facet.files.content, facet.files.delete):
            with pytest.raises(NotFoundError) as info:
                call(file.id)
            assert info.value.where == "file_id"
        facet.files.delete(inline.id)


def test_upload_errors_name_the_line_and_the_limit(url, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(JSONL + "not json\n")
    with Client(url, api_key=ADMIN) as facet:
        before = file_ids(facet)
        with pytest.raises(ValidationError) as info:
            facet.files.create(bad)
        assert info.value.status == 422 and info.value.where == "body.file"
        assert "line 5: invalid JSON" in str(info.value)
        with pytest.raises(ValidationError) as info:
            facet.files.create(JSONL.encode(), purpose="assistants")
        assert info.value.where == "body.purpose"
        with pytest.raises(BadRequestError) as info:
            facet.files.create(b"x" * (MAX_FILE_BYTES + 1))
        assert info.value.status == 413 and "exceeds" in info.value.message
        with pytest.raises(FileNotFoundError):
            facet.files.create(tmp_path / "missing.jsonl")
        assert file_ids(facet) == before


def test_fine_tune_from_an_uploaded_file_id(url, train_path):
    with Client(url, api_key=ADMIN) as facet:
        file = facet.files.create(train_path)
        job = facet.fine_tunes.create(
            "files-by-id", "lora", method_config={"r": 2}, training_file=file.id,
            validation_file=file.id, hyperparameters=HP,
        )  # fmt: skip
        assert job.raw["n_train"] == 4 and job.raw["n_val"] == 4 and job.raw["config"] == {"r": 2}
        done = facet.fine_tunes.wait(job.id, timeout=60, poll_interval=0.05)
        assert done.status == "succeeded" and done.step == 2 and done.epoch is not None
        assert done.val_loss is not None and done.tokens_per_s > 0 and done.eta_s is None
        assert (done.interruptions, done.resumed_from) == (0, None)
        assert facet.files.delete(file.id).deleted and facet.fine_tunes.get(job.id).status == "succeeded"


def test_fine_tune_uploads_a_local_path_once(url, train_path):
    with Client(url, api_key=ADMIN) as facet:
        before = set(file_ids(facet))
        job = facet.fine_tunes.create(
            "files-by-path", "lora", training_file=str(train_path), validation_file=train_path,
            hyperparameters=HP,
        )  # fmt: skip
        new = [f for f in facet.files.list() if f.id not in before]
        assert [(f.filename, f.records) for f in new] == [("train.jsonl", 4)]  # one upload for both
        assert facet.files.content(new[0].id) == JSONL and job.raw["n_val"] == 4
        assert facet.fine_tunes.wait(job.id, timeout=60, poll_interval=0.05).status == "succeeded"


def test_fine_tune_file_errors(url, tmp_path, train_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t1", "completion": "t2"}\nnot json\n')
    with Client(url, api_key=ADMIN) as facet:
        files, jobs = file_ids(facet), facet.fine_tunes.list().total
        with pytest.raises(ValidationError) as info:  # the upload's 422, naming the argument and line
            facet.fine_tunes.create("x", "lora", training_file=bad)
        assert info.value.where == "body.file"
        assert (
            "training_file" in str(info.value) and str(bad) in str(info.value) and "line 2" in str(info.value)
        )
        with pytest.raises(ValidationError) as info:  # an id the server does not know
            facet.fine_tunes.create("x", "lora", training_file="file-0123456789abcdef01234567")
        assert info.value.where == "body.training_file" and "no file" in info.value.message
        with pytest.raises(FileNotFoundError):  # nothing is uploaded before every path is read
            facet.fine_tunes.create("x", "lora", training_file=train_path, validation_file=tmp_path / "no")
        with pytest.raises(ValueError):
            facet.fine_tunes.create("x", "lora", training_data=RECORDS, training_file=bad)
        assert file_ids(facet) == files and facet.fine_tunes.list().total == jobs

    monkeypatch.chdir(tmp_path)
    Path("file-local.jsonl").write_text(JSONL)
    assert not is_file_id("file-local.jsonl") and is_file_id("file-0123") and not is_file_id(Path("file-0"))


@pytest.mark.asyncio
async def test_async_files_and_fine_tune(url, train_path):
    async with AsyncClient(url, api_key=ADMIN) as facet:
        seen: list[int] = []
        file = await facet.files.create(os.fspath(train_path), progress=seen.append)
        assert sum(seen) == len(JSONL)
        assert (await facet.files.get(file.id)).records == 4
        assert await facet.files.content(file.id) == JSONL
        assert file.id in [f.id for f in await facet.files.list()]
        job = await facet.fine_tunes.create(
            "files-async", "lora", training_file=train_path, hyperparameters=HP
        )
        done = await facet.fine_tunes.wait(job.id, timeout=60, poll_interval=0.05)
        assert done.status == "succeeded" and done.epoch == 0
        assert (await facet.files.delete(file.id)).deleted
        bad = train_path.with_name("bad.jsonl")
        bad.write_text("not json\n")
        with pytest.raises(ValidationError) as info:
            await facet.files.create(bad.read_bytes())
        assert "line 1" in str(info.value)
        with pytest.raises(ValidationError) as info:  # the upload's error, through the async steps
            await facet.fine_tunes.create("x", "lora", training_file=bad, validation_data=RECORDS)
        assert "training_file" in str(info.value) and "line 1" in str(info.value)
        with pytest.raises(NotFoundError):
            await facet.files.get(file.id)


def test_cli_files_and_fine_tune_from_a_file(url, train_path):
    base = ("--url", url, "--api-key", ADMIN)
    code, out, err = run_cli(*base, "files", "upload", str(train_path))
    assert code == 0 and "upload" in err, err
    file_id, name, records = out.split("\t")[:3]
    assert file_id.startswith("file-") and name == "train.jsonl" and records == "4 records"

    code, out, _ = run_cli(*base, "--json", "files", "list")
    assert code == 0 and file_id in [f["id"] for f in json.loads(out)["data"]]
    code, out, _ = run_cli(*base, "--json", "files", "get", file_id)
    assert code == 0 and json.loads(out)["records"] == 4
    code, out, _ = run_cli(*base, "files", "content", file_id)
    assert code == 0 and out == JSONL

    code, out, err = run_cli(
        *base, "fine-tune", "create", "--adapter-id", "files-cli", "--method", "lora",
        "--training-file", file_id, "--validation-file", str(train_path), "--method-config", '{"r": 2}',
        "--max-steps", "2", "--hyperparameters", '{"batch_size": 2}', "--watch", "--poll-interval", "0.05",
    )  # fmt: skip
    assert code == 0, err
    assert "succeeded" in out and "epoch 1" in out and "epoch=1" in err and "2/2" in err

    code, out, _ = run_cli(*base, "files", "delete", file_id)
    assert code == 0 and out.startswith(f"deleted {file_id}")
    code, _, err = run_cli(*base, "--json", "files", "rm", file_id)
    assert code == 1 and json.loads(err)["error"]["status"] == 404
    bad = train_path.with_name("bad.jsonl")
    bad.write_text("{}\n")
    code, _, err = run_cli(*base, "files", "upload", str(bad), "--no-progress")
    assert code == 1 and "422" in err and "line 1" in err
