"""Per-API-key quotas: one key's burst gets 429 + Retry-After while another key is still served,
and a slot comes back on every way a generation ends (done, stream done, cancel, failed submit).

The engine is held still inside its first forward by a pre-hook waiting on an event, so which
requests are in flight at each moment is fixed by construction, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

import pytest

from .conftest import serve

pytestmark = pytest.mark.asyncio

ADMIN, KEY_A, KEY_B = "admin-key-quota-000", "infer-key-quota-aaa", "infer-key-quota-bbb"
KEYS = [f"admin:{ADMIN}", f"infer:{KEY_A}", f"infer:{KEY_B}"]
BODY = {"prompt": "t1 t2 t3", "max_new_tokens": 3}
WAIT_S = 30.0  # hang guard only: every wait below ends on an event, not on a clock


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def engine_held(app):
    """The engine thread blocks at its next forward until the block is lifted."""
    gate = threading.Event()
    entered = threading.Event()

    def hold(module, args, kwargs):
        entered.set()
        assert gate.wait(WAIT_S), "the test never released the engine"

    handle = app.state.runtime.engine.base.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        yield gate, entered
    finally:
        handle.remove()
        gate.set()


async def until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


def in_flight(app, key_label: str) -> int:
    return app.state.runtime.quotas.in_flight(key_label)


async def test_a_key_over_its_concurrency_gets_429_while_another_key_is_served(make_app):
    app = make_app(api_keys=KEYS, key_max_concurrent=2, key_max_queued=8)
    async with serve(app) as client:
        with engine_held(app) as (gate, entered):
            streaming = asyncio.create_task(
                client.post("/generate", json={**BODY, "stream": True}, headers=auth(KEY_A))
            )
            plain = asyncio.create_task(client.post("/generate", json=BODY, headers=auth(KEY_A)))
            await until(lambda: in_flight(app, "key-2") == 2, "key A's two generations in flight")

            third = await client.post("/generate", json=BODY, headers=auth(KEY_A))
            assert third.status_code == 429, third.text
            assert third.headers["Retry-After"] == str(app.state.runtime.settings.retry_after_s)
            message = third.json()["error"]["message"]
            assert "key_max_concurrent" in message and "2 generations in flight" in message
            assert KEY_A not in third.text  # the key itself is never echoed
            openai = await client.post(
                "/v1/completions",
                json={"model": "tiny-llama", "prompt": "t1", "max_tokens": 2},
                headers=auth(KEY_A),
            )
            assert openai.status_code == 429 and "key_max_concurrent" in openai.text

            other = asyncio.create_task(client.post("/generate", json=BODY, headers=auth(KEY_B)))
            await until(lambda: in_flight(app, "key-3") == 1, "key B admitted while key A is at its limit")
            gate.set()
            results = await asyncio.gather(streaming, plain, other)
        assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
        assert "event: done" in results[0].text
        await until(lambda: in_flight(app, "key-2") == 0, "key A's slots released")
        again = await client.post("/generate", json=BODY, headers=auth(KEY_A))
        assert again.status_code == 200, again.text


async def test_a_key_over_its_queue_share_gets_429(make_app):
    app = make_app(api_keys=KEYS, key_max_concurrent=4, key_max_queued=1)
    async with serve(app) as client:
        with engine_held(app) as (gate, entered):
            # The engine is busy in key B's prefill, so key A's request waits for a batch slot.
            busy = asyncio.create_task(client.post("/generate", json=BODY, headers=auth(KEY_B)))
            await asyncio.to_thread(entered.wait, WAIT_S)
            first = asyncio.create_task(client.post("/generate", json=BODY, headers=auth(KEY_A)))
            await until(lambda: in_flight(app, "key-2") == 1, "key A's first request queued")
            second = await client.post("/generate", json=BODY, headers=auth(KEY_A))
            assert second.status_code == 429 and second.headers["Retry-After"]
            assert "key_max_queued" in second.json()["error"]["message"]
            gate.set()
            done = await asyncio.gather(busy, first)
        assert [r.status_code for r in done] == [200, 200]


async def test_cancelled_and_failed_submits_give_their_slot_back(make_app):
    app = make_app(api_keys=KEYS, key_max_concurrent=1, key_max_queued=1)
    async with serve(app) as client:
        unknown = await client.post("/generate", json={**BODY, "adapter": "no-such"}, headers=auth(KEY_A))
        assert unknown.status_code == 404
        assert in_flight(app, "key-2") == 0  # the submit failed: nothing holds the slot

        with engine_held(app) as (gate, entered):
            gone = asyncio.create_task(client.post("/generate", json=BODY, headers=auth(KEY_A)))
            await until(lambda: in_flight(app, "key-2") == 1, "key A's request in flight")
            gone.cancel()  # the client goes away: the handler cancels its generation
            with pytest.raises(asyncio.CancelledError):
                await gone
            gate.set()
            await until(lambda: in_flight(app, "key-2") == 0, "the cancelled generation's slot released")
        after = await client.post("/generate", json=BODY, headers=auth(KEY_A))
        assert after.status_code == 200, after.text


async def test_without_api_keys_there_are_no_key_quotas(make_app):
    app = make_app(key_max_concurrent=1)
    async with serve(app) as client:
        assert app.state.runtime.quotas is None
        responses = await asyncio.gather(*(client.post("/generate", json=BODY) for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
