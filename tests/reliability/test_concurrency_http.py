"""Adapters deleted, replaced, loaded cold and churned while requests run, over real HTTP.

docs/checklist.md D (#31, #32, #34, #35). The tiny random-weight Llama server runs as a subprocess;
adapters have random non-zero weights. Generation is greedy, so a response's text identifies the
weights that produced it: every response is compared with a reference made on a *distinct*
adapter id holding the same weights, and the adapters are checked to change the base model's
text (a silent fall-back to the base model, or a switch of version mid-stream, would show).

* delete under load: 16 streams on X, DELETE X -> each stream finishes on X version 1 with X's
  text, new requests get 404 at once, X's device slot is freed after the last stream ends;
* replace under load: 16 streams on X, re-upload X -> old streams keep version 1 and its text,
  requests sent meanwhile get version 2 and its text, version 1's slot is freed after;
* racing a replace: requests resolved to version 1 whose load meets the re-upload are served
  (by one version, with its text), never answered 404;
* thundering herd: 50 simultaneous first requests for a cold adapter -> loaded from disk and
  installed on device exactly once (``/metrics`` counters), 50 identical answers;
* churn: 30 adapters of every family round-robin under a device budget of a few slots, two of
  them pinned -> no errors, every answer equals the no-churn reference, device bytes never above
  the budget, pinned adapters on device at every scrape, evictions happen, RSS stays bounded.

Pinning has no HTTP route or setting, so the servers are this module run as a program,
``python -m tests.reliability.test_concurrency_http [--pin ID ...] [--load-delay S] [settings]``:
the tiny server with ``Engine.pin(ID)`` called before it serves, and loads from the store
made ``S`` seconds slower (so that the herd's requests all arrive while the first load runs).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import psutil
import pytest
import uvicorn

from bench.load import process_stats, scrape
from server.app import create_app
from server.engine.loader import wrap_model
from server.settings import settings_from_cli
from tests.api.conftest import FAMILY_CONFIGS, adapter_files
from tests.api.processes import server_process
from tests.api.tiny_server import TARGETS, build_tiny, tiny_settings
from tests.conftest import make_tiny_llama, make_tokenizer

SELF = "tests.reliability.test_concurrency_http"  # run as the servers' program (see main)
PROMPT = "t5 t6 t7"
N = 200  # tokens per stream: ~1 s on the tiny model, so streams are mid-way at delete/replace
STREAMS = 16
FAMILIES = list(FAMILY_CONFIGS)
PINS = ["pin-lora", "pin-hut"]
DEVICE_BUDGET = 64 << 10  # ~4 tiny adapters (a LoRA r4 slot is 16 KiB); the pins take ~30 KiB


@pytest.fixture(scope="module")
def base():
    """The tiny base model the servers use (same seed), for building adapter files."""
    return wrap_model("tiny-llama", make_tiny_llama(), make_tokenizer(), TARGETS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Room for every adapter; loads from the store take 0.1 s more, so a herd overlaps one."""
    data = tmp_path_factory.mktemp("concurrency")
    args = ["--data-dir", str(data), "--max-batch-size", "32", "--load-delay", "0.1"]
    with server_process(SELF, args, data / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def churn_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("churn")
    args = ["--data-dir", str(data), "--max-batch-size", "8", "--device-adapter-bytes", str(DEVICE_BUDGET)]
    args += ["--host-adapter-bytes", "150000", *[x for p in PINS for x in ("--pin", p)]]
    with server_process(SELF, args, data / "server.log") as url:
        yield url


# ------------------------------------------------------------------------------------ helpers


async def upload(c: httpx.AsyncClient, base, adapter_id: str, family: str, seed: int, tmp) -> dict:
    config, weights = adapter_files(base, family, tmp / f"{adapter_id}-{seed}", seed=seed)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    r = await c.post("/adapters", data={"adapter_id": adapter_id}, files=files)
    assert r.status_code == 201, r.text
    return r.json()


def body(adapter: str | None, n: int = N) -> dict:
    return {"prompt": PROMPT, "adapter": adapter, "max_new_tokens": n}


async def generate(c: httpx.AsyncClient, adapter: str | None, n: int = N) -> dict:
    r = await c.post("/generate", json=body(adapter, n))
    assert r.status_code == 200, r.text
    return r.json()


async def stream(c: httpx.AsyncClient, adapter: str, started: asyncio.Event) -> dict:
    """One SSE generation: status, ``[(event, data)]`` and when it ended (``started`` is set at
    its first event, or when it ends without one)."""
    events: list[tuple[str | None, dict]] = []
    status = None
    try:
        async with c.stream("POST", "/generate", json={**body(adapter), "stream": True}) as r:
            status, name = r.status_code, None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: ") :])))
                    started.set()
    finally:
        started.set()
    return {"status": status, "events": events, "ended": time.monotonic()}


async def start_streams(c: httpx.AsyncClient, adapter: str) -> list[asyncio.Task]:
    """``STREAMS`` streams on ``adapter``, returned once every one has produced a token."""
    started = [asyncio.Event() for _ in range(STREAMS)]
    tasks = [asyncio.create_task(stream(c, adapter, e)) for e in started]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    return tasks


def check_stream(result: dict, adapter: str, version: int, text: str, still_running_at: float) -> None:
    """Complete, one version, the text of that version's weights, not over before the event."""
    assert result["status"] == 200
    names = [n for n, _ in result["events"]]
    assert names == ["token"] * N + ["done"], names[-3:]  # no "error" event, nothing cut short
    done = result["events"][-1][1]
    assert (done["adapter"], done["adapter_version"], done["finish_reason"]) == (adapter, version, "length")
    assert "".join(d["text"] for n, d in result["events"] if n == "token") == done["text"] == text
    assert result["ended"] > still_running_at  # the delete/replace really happened mid-stream


async def until(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def server_pid(url: str) -> int:
    """The pid of the server subprocess this test process started for ``url``."""
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        if port in child.cmdline():
            return child.pid
    raise AssertionError(f"no child process serves {url}")


def device_count(url: str, family: str) -> float:
    """Adapters of ``family`` in device slots (``/metrics``)."""
    return scrape(url)[f'facet_adapters_resident{{family="{family}",tier="device"}}']


# -------------------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_delete_while_streaming(server, base, tmp_path):
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        await upload(c, base, "del-x", "lora", 11, tmp_path)
        await upload(c, base, "del-ref", "lora", 11, tmp_path)
        ref, plain = (await generate(c, "del-ref"))["text"], (await generate(c, None))["text"]
        assert ref != plain  # the adapter changes the greedy text: a fall-back would show

        tasks = await start_streams(c, "del-x")
        deleted = await c.delete("/adapters/del-x")
        at = time.monotonic()
        assert deleted.status_code == 200
        assert "device" in deleted.json()["residency"]  # still in use: not freed yet
        on_device = await asyncio.to_thread(device_count, server, "lora")
        late = await asyncio.gather(
            c.post("/generate", json=body("del-x", 4)),
            c.post("/v1/completions", json={"model": "del-x", "prompt": PROMPT, "max_tokens": 4}),
        )
        for r in late:
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", r.text
        for result in await asyncio.wait_for(asyncio.gather(*tasks), 60):
            check_stream(result, "del-x", 1, ref, at)

        assert (await c.get("/adapters/del-x")).status_code == 404
        await until(lambda: device_count(server, "lora") == on_device - 1)  # freed after the last


@pytest.mark.asyncio
async def test_replace_while_streaming(server, base, tmp_path):
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        await upload(c, base, "rep-x", "hut", 21, tmp_path)
        await upload(c, base, "rep-v1", "hut", 21, tmp_path)
        await upload(c, base, "rep-v2", "ether", 22, tmp_path)
        v1, v2 = (await generate(c, "rep-v1"))["text"], (await generate(c, "rep-v2"))["text"]
        plain = (await generate(c, None))["text"]
        assert len({v1, v2, plain}) == 3

        tasks = await start_streams(c, "rep-x")
        hut_on_device = await asyncio.to_thread(device_count, server, "hut")
        replaced = await upload(c, base, "rep-x", "ether", 22, tmp_path)
        at = time.monotonic()
        assert replaced["version"] == 2
        newer = await asyncio.gather(*(generate(c, "rep-x") for _ in range(8)))  # beside the old ones
        for r in newer:
            assert (r["adapter_version"], r["text"]) == (2, v2)
        for result in await asyncio.wait_for(asyncio.gather(*tasks), 60):
            check_stream(result, "rep-x", 1, v1, at)

        assert (await c.get("/adapters/rep-x")).json()["version"] == 2
        await until(lambda: device_count(server, "hut") == hut_on_device - 1)  # version 1 freed


@pytest.mark.asyncio
async def test_requests_racing_a_replace_get_one_version_never_404(server, base, tmp_path):
    """Requests resolved to version 1 whose (slow) load meets the re-upload: served, not 404."""
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        await upload(c, base, "race-x", "lora", 51, tmp_path)
        await upload(c, base, "race-v1", "lora", 51, tmp_path)
        await upload(c, base, "race-v2", "hut", 52, tmp_path)
        texts = {1: (await generate(c, "race-v1", 8))["text"], 2: (await generate(c, "race-v2", 8))["text"]}

        async def later(seconds: float) -> tuple[float, httpx.Response]:
            await asyncio.sleep(seconds)
            return time.monotonic(), await c.post("/generate", json=body("race-x", 8))

        racing = [asyncio.create_task(later(i * 0.01)) for i in range(10)]  # cold: each load 0.1 s
        await asyncio.sleep(0.03)
        assert (await upload(c, base, "race-x", "hut", 52, tmp_path))["version"] == 2
        replaced = time.monotonic()
        answers = await asyncio.gather(*racing)
    assert any(sent < replaced for sent, _ in answers)  # some were resolved to version 1 first
    for _, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["text"] == texts[r.json()["adapter_version"]]


@pytest.mark.asyncio
async def test_fifty_simultaneous_first_requests_load_a_cold_adapter_once(server, base, tmp_path):
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        await upload(c, base, "herd", "lora", 31, tmp_path)
        assert (await c.get("/adapters/herd")).json()["residency"] == ["disk"]  # cold
        plain = (await generate(c, None, 8))["text"]
        before = await asyncio.to_thread(scrape, server)
        answers = await asyncio.gather(*(c.post("/generate", json=body("herd", 8)) for _ in range(50)))
        after = await asyncio.to_thread(scrape, server)

        assert [r.status_code for r in answers] == [200] * 50
        outputs = {(r.json()["adapter_version"], r.json()["text"]) for r in answers}
        assert len(outputs) == 1 and outputs.pop() == (1, answers[0].json()["text"])
        assert answers[0].json()["text"] != plain
        for counter in ("loads", "host_cache_misses", "device_installs"):
            name = f"facet_adapter_{counter}_total"
            assert after[name] - before[name] == 1, counter
        assert (await c.get("/adapters/herd")).json()["residency"] == ["disk", "host", "device"]


@pytest.mark.asyncio
async def test_churn_beyond_the_device_budget_keeps_pins_and_bounds_memory(
    server, churn_server, base, tmp_path
):
    url, pid = churn_server, server_pid(churn_server)
    adapters = {p: ("lora" if "lora" in p else "hut", 40 + i) for i, p in enumerate(PINS)}
    adapters |= {f"churn-{i}": (FAMILIES[i % len(FAMILIES)], 100 + i) for i in range(30)}
    refs = {}
    async with httpx.AsyncClient(base_url=server, timeout=60) as ref_client:  # no churn there
        for adapter_id, (family, seed) in adapters.items():
            await upload(ref_client, base, f"ref-{adapter_id}", family, seed, tmp_path)
            refs[adapter_id] = (await generate(ref_client, f"ref-{adapter_id}", 16))["text"]

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for adapter_id, (family, seed) in adapters.items():
            await upload(c, base, adapter_id, family, seed, tmp_path)
        for p in PINS:
            await generate(c, p, 4)
        rss = [process_stats(pid)["rss_mb"]]
        before = await asyncio.to_thread(scrape, url)
        order = [a for _ in range(3) for a in adapters if a not in PINS]
        order = [PINS[i % 2] if i % 5 == 0 else a for i, a in enumerate(order)]
        gate, done, scrapes = asyncio.Semaphore(8), asyncio.Event(), []

        async def one(adapter_id: str) -> tuple[str, httpx.Response]:
            async with gate:
                return adapter_id, await c.post("/generate", json=body(adapter_id, 16))

        async def watch() -> None:
            while not done.is_set():
                m = await asyncio.to_thread(scrape, url)
                pins = [(await c.get(f"/adapters/{p}")).json()["residency"] for p in PINS]
                scrapes.append((m["facet_adapter_device_bytes"], pins))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        answers = await asyncio.wait_for(asyncio.gather(*(one(a) for a in order)), 60)
        done.set()
        await watcher
        after = await asyncio.to_thread(scrape, url)
        rss.append(process_stats(pid)["rss_mb"])

    for adapter_id, r in answers:
        assert r.status_code == 200, r.text
        assert (r.json()["adapter"], r.json()["text"]) == (adapter_id, refs[adapter_id])
    assert len(scrapes) >= 5
    assert max(b for b, _ in scrapes) <= DEVICE_BUDGET
    assert all(pins == [["disk", "host", "device"]] * 2 for _, pins in scrapes)
    grew = {k: after[k] - before[k] for k in before if k in after}  # info series change labels
    assert grew['facet_adapter_evictions_total{tier="device"}'] >= 30
    assert grew['facet_adapter_evictions_total{tier="host"}'] > 0
    assert grew["facet_adapter_loads_total"] >= 30  # reloaded from disk after host evictions
    assert rss[1] - rss[0] < 30, rss  # MiB


# ------------------------------------------------------------ the churn server (a subprocess)


def main(argv: list[str]) -> None:
    """The tiny server (``tests.api.tiny_server``) with ``(ID, 1)`` pinned for every ``--pin ID``
    and ``--load-delay S`` seconds added to every adapter load from the store (a slow disk)."""
    pins, delay, rest, args = [], 0.0, [], iter(argv)
    for arg in args:
        if arg == "--pin":
            pins.append(next(args))
        elif arg == "--load-delay":
            delay = float(next(args))
        else:
            rest.append(arg)
    settings = tiny_settings(**settings_from_cli(rest).model_dump(exclude_unset=True))
    engine, store = build_tiny(settings)
    for adapter_id in pins:
        engine.pin(adapter_id)
    if delay:
        load = engine.residency.source
        engine.residency.source = lambda key: (time.sleep(delay), load(key))[1]
    app = create_app(settings, engine=engine, store=store)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
