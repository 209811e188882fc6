"""Following a fine-tune job: SSE events, the loss-curve PNG, and the job metrics."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import pytest

from server.api.finetune import follow_events
from server.api.plot import TRAIN_COLOR, VAL_COLOR, plot_png
from tests.api.conftest import serve
from tests.jobs.test_api import BODY, app, wait_done  # noqa: F401  (app is a fixture)
from tests.metrics.conftest import parse, value

pytestmark = pytest.mark.asyncio

TERMINAL = ("succeeded", "failed", "cancelled")


def parse_sse(text: str) -> list[dict]:
    """SSE text -> [{"id", "event", "data"}] (comment lines skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict = {}
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            key, _, val = line.partition(": ")
            fields[key] = val
        if fields:
            fields["data"] = json.loads(fields["data"])
            out.append(fields)
    return out


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG with filter 0 rows; checks CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, color_type, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type) == (8, 2)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + width * 3)
    stride = 1 + width * 3
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def count_color(rows: list[bytes], color: tuple[int, int, int]) -> int:
    needle = bytes(color)
    return sum(1 for r in rows for i in range(0, len(r), 3) if r[i : i + 3] == needle)


async def test_the_event_stream_follows_a_job_to_its_end(app):  # noqa: F811
    async with serve(app) as client:
        job = (await client.post("/fine-tunes", json=BODY)).json()
        url = f"/fine-tunes/{job['id']}/events"
        response = await client.get(url, headers={"Accept": "text/event-stream"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        seqs = [int(e["id"]) for e in events]
        assert seqs == list(range(1, len(events) + 1))  # in order, none missing
        types = [e["event"] for e in events]
        assert types[:2] == ["created", "started"] and types[-1] == "succeeded"
        assert types.count("step") == 3 and all(t not in TERMINAL for t in types[:-1])
        assert [e["data"]["seq"] for e in events] == seqs
        # The same events as the JSON listing, now that the job is over.
        listed = (await client.get(url)).json()["events"]
        assert [e["data"] for e in events] == listed

        later = parse_sse((await client.get(url, params={"stream": "true", "after": 2})).text)
        assert [int(e["id"]) for e in later] == seqs[2:]
        assert (await client.get("/fine-tunes/ft-nope/events?stream=true")).status_code == 404


async def test_the_event_stream_can_be_closed_while_the_job_runs(app):  # noqa: F811
    """A client that goes away closes the response's iterator: it stops at once."""
    async with serve(app) as client:
        body = {**BODY, "adapter_id": "long", "hyperparameters": {"max_steps": 100000, "batch_size": 1}}
        job = (await client.post("/fine-tunes", json=body)).json()
        stream = follow_events(app.state.runtime.jobs, job["id"], poll_s=0.05)

        async def until_step() -> None:
            async for text in stream:
                if text.startswith("id:") and "event: step" in text:
                    return

        await asyncio.wait_for(until_step(), 30)
        await asyncio.wait_for(stream.aclose(), 5)
        assert (await client.get(f"/fine-tunes/{job['id']}")).json()["status"] == "running"
        await client.post(f"/fine-tunes/{job['id']}/cancel")
        assert (await wait_done(client, job["id"]))["status"] == "cancelled"


async def test_the_loss_curve_is_a_png_with_both_series(app):  # noqa: F811
    async with serve(app) as client:
        job = (await client.post("/fine-tunes", json=BODY)).json()
        assert (await wait_done(client, job["id"]))["status"] == "succeeded"
        response = await client.get(f"/fine-tunes/{job['id']}/loss.png")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        width, height, rows = decode_png(response.content)
        assert (width, height) == (640, 360)
        assert count_color(rows, TRAIN_COLOR) > 100  # a polyline, not just the legend swatch
        assert count_color(rows, VAL_COLOR) > 100
        assert (await client.get("/fine-tunes/ft-nope/loss.png")).status_code == 404


async def test_a_job_without_steps_gets_empty_axes(app):  # noqa: F811
    async with serve(app) as client:
        runner = app.state.runtime.jobs
        runner.stop()  # nothing trains: the job stays queued
        job = (await client.post("/fine-tunes", json=BODY)).json()
        response = await client.get(f"/fine-tunes/{job['id']}/loss.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        _, _, rows = decode_png(response.content)
        assert count_color(rows, TRAIN_COLOR) == 0 and count_color(rows, VAL_COLOR) == 0
        assert count_color(rows, (0, 0, 0)) > 0  # the axes


async def test_plot_png_handles_single_points_and_non_finite_values():
    _, _, rows = decode_png(plot_png([([(1, 2.0)], TRAIN_COLOR), ([(0, float("nan"))], VAL_COLOR)]))
    assert count_color(rows, TRAIN_COLOR) > 0 and count_color(rows, VAL_COLOR) == 0


async def test_job_metrics_after_a_job_succeeds(app):  # noqa: F811
    async with serve(app) as client:
        before = parse((await client.get("/metrics")).text)
        assert value(before, "facet_fine_tune_jobs", state="succeeded") == 0
        assert value(before, "facet_fine_tune_steps_total") == 0
        assert ("facet_fine_tune_last_loss", ()) not in before
        job = (await client.post("/fine-tunes", json=BODY)).json()
        done = await wait_done(client, job["id"])
        assert done["status"] == "succeeded"
        samples = parse((await client.get("/metrics")).text)
        assert value(samples, "facet_fine_tune_jobs", state="succeeded") == 1
        for state in ("queued", "running", "failed", "cancelled"):
            assert ("facet_fine_tune_jobs", (("state", state),)) in samples
            assert value(samples, "facet_fine_tune_jobs", state=state) == 0
        assert value(samples, "facet_fine_tune_steps_total") == done["result"]["steps"] == 3
        assert value(samples, "facet_fine_tune_last_loss") == pytest.approx(done["result"]["train_loss"])


async def test_a_client_disconnect_ends_the_event_stream(app):  # noqa: F811
    """Through the whole app (middlewares included): ``http.disconnect`` ends the response."""
    async with serve(app) as client:
        body = {**BODY, "adapter_id": "long", "hyperparameters": {"max_steps": 100000, "batch_size": 1}}
        job = (await client.post("/fine-tunes", json=body)).json()
        sent: list[bytes] = []
        got_step, gone = asyncio.Event(), asyncio.Event()
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                sent.append(message.get("body", b""))
                if b"event: step" in b"".join(sent):
                    got_step.set()

        path = f"/fine-tunes/{job['id']}/events"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "server": ("facet.test", 80),
            "client": ("127.0.0.1", 1234),
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"stream=true",
            "headers": [(b"host", b"facet.test")],
        }
        call = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(got_step.wait(), 20)
        gone.set()
        await asyncio.wait_for(call, 5)  # the response ended although the job still runs
        assert (await client.get(f"/fine-tunes/{job['id']}")).json()["status"] == "running"
        await client.post(f"/fine-tunes/{job['id']}/cancel")
        assert (await wait_done(client, job["id"]))["status"] == "cancelled"
