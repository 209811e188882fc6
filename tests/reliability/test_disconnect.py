"""Client disconnect = abort, seen from ``/metrics`` (checklist 4.F item 42).

tests/api/test_server_process.py proves one disconnecting client cancels its generation, and
tests/metrics/test_metrics.py that one aborted stream counts as ``cancelled``. This proves it at
scale, over real HTTP (uvicorn in a thread, engine slowed to ~20 ms a step so every generation
would take seconds): 20 streaming clients hang up after their first token and 20 non-streaming
clients give up (read timeout) mid-generation, more than fit in one batch, so requests are
cancelled both while running and while waiting. Then, within ``SETTLE_S`` of the last hang-up:

* ``facet_requests_running`` and ``facet_requests_waiting`` are back to 0 (and the engine agrees);
* ``facet_generation_requests_total{finish_reason="cancelled"}`` grew by exactly 40;
* no more tokens are generated afterwards, and far fewer than 40 full generations were.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.api.processes import server_thread
from tests.api.tiny_server import create_tiny_app, tiny_settings
from tests.metrics.conftest import parse, value

N_STREAM = N_PLAIN = 20
MAX_NEW = 200  # ~4 s at 20 ms a step: nobody finishes before hanging up
SETTLE_S = 10.0  # a hang detector only: the time to 0 is printed (typically well under 1 s)
BODY = {"prompt": "t1 t2", "max_new_tokens": MAX_NEW}


@pytest.fixture
def slow_url(tmp_path):
    app = create_tiny_app(tiny_settings(data_dir=tmp_path / "data", max_batch_size=16))
    with server_thread(app) as url:
        generator = app.state.runtime.engine.generator
        step = generator.step
        generator.step = lambda: (time.sleep(0.02), step())[1]
        yield url, generator


def scrape(url: str):
    return parse(httpx.get(url + "/metrics", timeout=5).text)


def hang_up_after_first_token(url: str, errors: list) -> None:
    try:
        with httpx.stream("POST", url + "/generate", json={**BODY, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection
        errors.append("stream ended before its first token")
    except Exception as e:
        errors.append(repr(e))


def give_up(url: str, timeout: float, errors: list) -> None:
    try:
        r = httpx.post(url + "/generate", json=BODY, timeout=httpx.Timeout(10, read=timeout))
        errors.append(f"plain request finished: {r.status_code}")
    except httpx.ReadTimeout:
        pass  # the client hangs up
    except Exception as e:
        errors.append(repr(e))


def test_forty_disconnects_return_the_running_gauge_to_zero(slow_url):
    url, generator = slow_url
    before = scrape(url)
    errors: list[str] = []
    threads = [
        threading.Thread(target=hang_up_after_first_token, args=(url, errors)) for _ in range(N_STREAM)
    ]
    threads += [threading.Thread(target=give_up, args=(url, 0.3 + 0.05 * i, errors)) for i in range(N_PLAIN)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, value(scrape(url), "facet_requests_running"))
        time.sleep(0.05)
    hung_up = time.monotonic()
    assert errors == []
    assert peak >= 8, f"at most {peak} generations ever ran: the test did not load the engine"

    while True:
        after = scrape(url)
        idle = value(after, "facet_requests_running") == value(after, "facet_requests_waiting") == 0
        if idle and generator.num_running == generator.num_waiting == 0:
            break
        assert time.monotonic() - hung_up < SETTLE_S, (
            f"{value(after, 'facet_requests_running')} running, "
            f"{value(after, 'facet_requests_waiting')} waiting {SETTLE_S} s after the last disconnect"
        )
        time.sleep(0.02)
    print(f"gauges at 0 {time.monotonic() - hung_up:.2f} s after the last disconnect")

    def delta(samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + SETTLE_S  # the finish event may be counted just after
    while delta(after, "facet_generation_requests_total", finish_reason="cancelled") < 40:
        assert time.monotonic() < deadline, delta(
            after, "facet_generation_requests_total", finish_reason="cancelled"
        )
        time.sleep(0.02)
        after = scrape(url)
    assert delta(after, "facet_generation_requests_total", finish_reason="cancelled") == 40
    assert delta(after, "facet_generation_requests_total", finish_reason="length") == 0
    tokens = delta(after, "facet_generation_tokens_total")
    assert 0 < tokens < 40 * MAX_NEW / 4, tokens
    time.sleep(0.5)
    assert delta(scrape(url), "facet_generation_tokens_total") == tokens, "tokens generated after the aborts"
