"""facet_client fine-tunes: Client / AsyncClient / CLI against a real uvicorn tiny-model server."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from .conftest import ADMIN, INFER

facet_client = pytest.importorskip("facet_client")
from facet_client import (  # noqa: E402
    AsyncClient,
    Client,
    ConflictError,
    FineTuneError,
    FineTuneTimeout,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from facet_client.cli import main as cli  # noqa: E402

RECORDS = [{"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"} for i in range(4)]
HP = {"max_steps": 3, "batch_size": 2, "learning_rate": 0.01}
LONG = {"max_steps": 100000, "batch_size": 1}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_create_wait_events_list_and_serve(server_url):
    with Client(server_url, api_key=ADMIN) as facet:
        job = facet.fine_tunes.create(
            "ft-client", "lora", method_config={"r": 2}, training_data=RECORDS,
            validation_data=RECORDS, hyperparameters=HP,
        )  # fmt: skip
        assert job.id.startswith("ft-") and job.adapter_id == "ft-client" and job.method == "lora"
        assert job.raw["config"] == {"r": 2}  # sent as method_config
        events = list(facet.fine_tunes.watch(job.id, poll_interval=0.05))
        assert [e.type for e in events][:2] == ["created", "started"] and events[-1].type == "succeeded"
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        assert [e.data["step"] for e in events if e.type == "step"] == [1, 2, 3]
        done = facet.fine_tunes.wait(job.id, timeout=30)
        assert done.status == "succeeded" and done.done and done.step == 3 and done.result["steps"] == 3
        assert [e.seq for e in facet.fine_tunes.events(job.id, after=2)][0] == 3
        page = facet.fine_tunes.list()
        assert page.total >= 1 and job.id in [j.id for j in page.jobs]
        assert facet.generate("t1 t10", adapter="ft-client", max_new_tokens=2).adapter == "ft-client"
        with pytest.raises(ConflictError):
            facet.fine_tunes.cancel(job.id)
        with pytest.raises(NotFoundError):
            facet.fine_tunes.get("ft-nope")


def test_invalid_requests_raise_with_the_servers_where(server_url, tmp_path):
    with Client(server_url, api_key=ADMIN) as facet:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "t1", "completion": "t2"}\nnot json\n')
        with pytest.raises(ValidationError) as info:  # inline data: the job's 422
            facet.fine_tunes.create("x", "lora", training_data=bad.read_text())
        assert info.value.where == "body.training_data" and "line 2" in info.value.message
        with pytest.raises(ValidationError) as info:  # a local file: the upload's 422 (POST /files)
            facet.fine_tunes.create("x", "lora", training_file=bad)
        assert info.value.where == "body.file" and "line 2" in info.value.message
        with pytest.raises(ValidationError) as info:
            facet.fine_tunes.create("x", "lora", training_data=RECORDS, method_config={"r": 0})
        assert info.value.where.startswith("body.method_config")
        with pytest.raises(ValidationError) as info:
            facet.fine_tunes.create("x", "nope", training_data=RECORDS)
        assert info.value.where == "body.method"
        with pytest.raises(ValueError):
            facet.fine_tunes.create("x", "lora")
        with pytest.raises(ValueError):
            facet.fine_tunes.create("x", "lora", training_data=RECORDS, training_file=bad)
    with Client(server_url, api_key=INFER) as facet, pytest.raises(PermissionDeniedError):
        facet.fine_tunes.list()


def test_wait_times_out_and_a_cancelled_job_raises(server_url):
    with Client(server_url, api_key=ADMIN) as facet:
        job = facet.fine_tunes.create("ft-long", "lora", training_data=RECORDS, hyperparameters=LONG)
        with pytest.raises(FineTuneTimeout) as info:
            facet.fine_tunes.wait(job.id, timeout=0.2, poll_interval=0.05)
        assert info.value.job.status in ("queued", "running")
        assert facet.fine_tunes.cancel(job.id).status in ("running", "cancelled")
        with pytest.raises(FineTuneError) as info:
            facet.fine_tunes.wait(job.id, timeout=30, poll_interval=0.05)
        assert info.value.job.status == "cancelled" and info.value.type == "fine_tune_cancelled"


def test_wait_raises_the_servers_error_for_a_failed_job():
    job = {"id": "ft-1", "adapter_id": "a", "method": "lora", "status": "failed", "error": "out of memory"}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=job))
    with Client("http://facet", transport=transport) as facet, pytest.raises(FineTuneError) as info:
        facet.fine_tunes.wait("ft-1", timeout=1)
    assert "out of memory" in str(info.value) and info.value.job.error == "out of memory"


@pytest.mark.asyncio
async def test_async_fine_tunes(server_url):
    async with AsyncClient(server_url, api_key=ADMIN) as facet:
        job = await facet.fine_tunes.create("ft-async", "lora", training_data=RECORDS, hyperparameters=HP)
        types = [e.type async for e in facet.fine_tunes.watch(job.id, poll_interval=0.05)]
        assert types[0] == "created" and types[-1] == "succeeded"
        done = await facet.fine_tunes.wait(job.id, timeout=30, poll_interval=0.05)
        assert done.status == "succeeded" and (await facet.fine_tunes.get(job.id)).step == 3
        assert (await facet.fine_tunes.events(job.id, after=1))[0].seq == 2
        assert job.id in [j.id for j in (await facet.fine_tunes.list()).jobs]
        long = await facet.fine_tunes.create(
            "ft-async-long", "lora", training_data=RECORDS, hyperparameters=LONG
        )
        with pytest.raises(FineTuneTimeout):
            await facet.fine_tunes.wait(long.id, timeout=0.1, poll_interval=0.05)
        await facet.fine_tunes.cancel(long.id)
        with pytest.raises(FineTuneError):
            await facet.fine_tunes.wait(long.id, timeout=30, poll_interval=0.05)


def test_cli_fine_tune(server_url, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    base = ("--url", server_url, "--api-key", ADMIN)
    code, out, err = run_cli(
        *base, "--json", "fine-tune", "create", "--adapter-id", "ft-cli", "--method", "lora",
        "--data", str(data), "--config", '{"r": 2}', "--max-steps", "2",
    )  # fmt: skip
    assert code == 0, err
    job = json.loads(out)
    assert job["adapter_id"] == "ft-cli" and job["hyperparameters"]["max_steps"] == 2

    code, out, err = run_cli(*base, "fine-tune", "watch", job["id"], "--poll-interval", "0.05")
    assert code == 0, err
    assert "succeeded" in out and "2/2" in err  # the tqdm bar goes to stderr

    code, out, err = run_cli(*base, "--json", "fine-tune", "watch", job["id"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["type"] == "created" and events[-1]["type"] == "succeeded"

    code, out, _ = run_cli(*base, "fine-tune", "list")
    assert code == 0 and job["id"] in out
    code, out, _ = run_cli(*base, "--json", "fine-tune", "get", job["id"])
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, out, _ = run_cli(*base, "fine-tune", "events", job["id"], "--after", "1")
    assert code == 0 and out.startswith("2\t")

    code, out, err = run_cli(
        *base, "fine-tune", "create", "--adapter-id", "ft-cli-watched", "--method", "lora",
        "--data", str(data), "--validation-data", str(data), "--max-steps", "2", "--watch",
        "--hyperparameters", '{"batch_size": 2}', "--poll-interval", "0.05",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("ft-cli-watched") == 2 and "succeeded" in out and "eval:" in err

    code, _, err = run_cli(*base, "--json", "fine-tune", "cancel", job["id"])
    assert code == 1 and json.loads(err)["error"]["status"] == 409

    code, out, err = run_cli(
        *base, "--json", "fine-tune", "create", "--adapter-id", "ft-cli-long", "--method", "lora",
        "--data", str(data), "--max-steps", "100000",
    )  # fmt: skip
    assert code == 0, err
    long = json.loads(out)
    code, out, err = run_cli(*base, "--json", "fine-tune", "cancel", long["id"])
    assert code == 0 and json.loads(out)["status"] in ("running", "cancelled")
    code, out, err = run_cli(
        *base, "fine-tune", "watch", long["id"], "--no-progress", "--poll-interval", "0.05"
    )
    assert code == 1 and "cancelled" in err

    code, _, err = run_cli(
        *base, "fine-tune", "create", "--adapter-id", "x", "--method", "lora", "--data", "/nope"
    )
    assert code == 1 and "/nope" in err


def test_upload_reports_progress(server_url, adapter_folder):
    seen: list[int] = []
    with Client(server_url, api_key=ADMIN) as facet:
        adapter = facet.adapters.upload(adapter_folder, "ft-progress", progress=seen.append)
    total = sum(p.stat().st_size for p in adapter_folder.iterdir())
    assert adapter.adapter_id == "ft-progress" and sum(seen) == total
    code, _, err = run_cli("--url", server_url, "--api-key", ADMIN, "adapters", "upload", str(adapter_folder))
    assert code == 0 and "upload" in err and "B/s" in err, err
