"""Load and backpressure over real HTTP: capacity, then open-loop overload at a multiple of it.

    .venv/bin/python bench/load.py                     # python -m server (SmolLM2-135M, CPU)
    .venv/bin/python bench/load.py --tiny              # the tiny random-weight Llama test server
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --pid 1234   # a server already up

1. Capacity: closed loop, ``--concurrency`` clients each sending the next ``/generate`` as soon as
   the previous one answers (50 ms after a 429), for ``--capacity-seconds``; capacity = requests
   completed within that window / its length.
2. Overload: open loop (arrivals at fixed intervals, never waiting for answers) at ``--factor``
   times that capacity for ``--duration`` seconds. With a small ``--max-queue`` the server must
   refuse the excess at once with 429 + ``Retry-After`` and complete everything it admitted.

Reports admitted/completed, 429s and their latency, 5xx (must be 0), latency of the admitted,
the server's RSS (psutil on its pid) before and after, and the running/waiting gauges after the
run (must return to 0). Prints a table; writes ``bench/results/load[-tiny].json``. Everything is
loopback only. ``tests/reliability/test_load.py`` runs a short version against the tiny server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.api.processes import free_port, wait_ready  # noqa: E402

RESULTS = REPO / "bench" / "results"


# ------------------------------------------------------------------------------ the server


@dataclass
class Server:
    url: str
    pid: int


@contextmanager
def launch(tiny: bool, model: str | None, args: list[str], env: dict | None = None) -> Iterator[Server]:
    """Start ``tests.api.tiny_server`` (``tiny``) or ``python -m server`` on a free loopback port
    with a fresh data dir (the model cache stays ``var/models``) and ``env`` added to this
    process's environment; stop it with SIGTERM after."""
    tmp = tempfile.TemporaryDirectory(prefix="facet-bench-")
    data = Path(tmp.name)
    port = free_port()
    cmd = [sys.executable, "-m", "tests.api.tiny_server" if tiny else "server"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)]
    if not tiny:
        cmd += ["--models-dir", str(REPO / "var" / "models")] + (["--model", model] if model else [])
    log = data / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args], cwd=REPO, stdout=out, stderr=out, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 600, alive=lambda: proc.poll() is None, log=log)
        yield Server(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tmp.cleanup()


def process_stats(pid: int) -> dict:
    """RSS (MiB), open fds and threads of the server process."""
    p = psutil.Process(pid)
    return {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads()}


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as ``{'name{label="v",...}': value}`` (labels sorted; no label -> bare name)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def gauges_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Poll until ``facet_requests_running`` and ``facet_requests_waiting`` are 0 (or time out);
    returns their last values."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        last = {k: m[k] for k in ("facet_requests_running", "facet_requests_waiting")}
        if not any(last.values()) or time.monotonic() > deadline:
            return last
        time.sleep(0.05)


class GaugePeaks:
    """While entered, scrape ``/metrics`` every ``every_s`` on a thread and keep the largest
    ``facet_requests_running`` and ``facet_requests_waiting`` seen (the queue bound, observed)."""

    NAMES = ("facet_requests_running", "facet_requests_waiting")

    def __init__(self, url: str, every_s: float = 0.05):
        self.url, self.every_s = url, every_s
        self.peaks = dict.fromkeys(self.NAMES, 0.0)
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = scrape(self.url)
            except httpx.HTTPError:
                m = {}
            for k in self.NAMES:
                self.peaks[k] = max(self.peaks[k], m.get(k, 0.0))
            self.scrapes += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> GaugePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peaks["scrapes"] = self.scrapes


# ------------------------------------------------------------------------------ the clients


@dataclass
class Outcome:
    status: int  # HTTP status; 0 for a transport error
    seconds: float
    retry_after: str | None = None
    tokens: int = 0  # completion tokens of a 200
    error: str | None = None  # the transport error's type, for status 0


async def _one(client: httpx.AsyncClient, body: dict) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = await client.post("/generate", json=body)
    except httpx.TransportError as e:
        return Outcome(0, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])
    seconds = time.perf_counter() - t0
    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
    return Outcome(r.status_code, seconds, r.headers.get("retry-after"), tokens)


def client_for(url: str, timeout: float = 300, keep_alive: bool = True) -> httpx.AsyncClient:
    """Generous pool: an open loop must never wait for a connection (that would hide overload).

    ``keep_alive=False`` gives every request its own connection: the open loop's arrivals are
    independent clients. (With a shared pool, a client whose event loop lags behind by seconds,
    as an overloaded 2-core machine makes it, reuses a connection the server already closed after
    its keep-alive timeout, and the request dies with a ReadError before the server sees it.)
    """
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200 if keep_alive else 0)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)


async def closed_loop(url: str, body: dict, concurrency: int, seconds: float) -> tuple[float, list[Outcome]]:
    """``concurrency`` back-to-back clients for ``seconds``: (200s completed within the window
    per second, outcomes). Requests still running at the end are awaited but not counted: the
    drain after the window runs below capacity and would bias it down."""
    outcomes: list[Outcome] = []
    in_window = 0
    async with client_for(url) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal in_window
            while time.perf_counter() < deadline:
                outcomes.append(await _one(client, body))
                in_window += outcomes[-1].status == 200 and time.perf_counter() <= deadline
                if outcomes[-1].status == 429:  # a batch ended at once: back off, don't hammer
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return in_window / seconds, outcomes


async def open_loop(url: str, body: dict, rate: float, seconds: float) -> tuple[list[Outcome], dict]:
    """Arrivals every ``1/rate`` s for ``seconds``, never waiting for answers: every outcome, and
    how well the client kept the schedule (a late client would hide overload: check the lag)."""
    async with client_for(url, keep_alive=False) as client:
        tasks, lag = [], 0.0
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            due = t0 + i / rate
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            lag = max(lag, time.perf_counter() - due)
            tasks.append(asyncio.create_task(_one(client, body)))
        sending = time.perf_counter() - t0
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, {"sent_rps": round(len(tasks) / sending, 2), "max_send_lag_ms": _ms(lag)}


async def burst(url: str, body: dict, n: int) -> list[Outcome]:
    """``n`` requests at once, each on its own connection: every outcome."""
    async with client_for(url, keep_alive=False) as client:
        return list(await asyncio.gather(*(_one(client, body) for _ in range(n))))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o.seconds for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {
        "sent": len(outcomes),
        "statuses": dict(sorted(statuses.items())),  # "0": no HTTP answer (transport error)
        "completed": len(ok),
        "completion_tokens_mean": round(sum(o.tokens for o in outcomes) / max(1, len(ok)), 1),
        "refused_429": len(refused),
        "refused_without_retry_after": sum(o.retry_after is None for o in refused),
        "server_errors_5xx": sum(o.status >= 500 for o in outcomes),
        "transport_errors": sum(o.status == 0 for o in outcomes),
        "transport_error_kinds": sorted({o.error for o in outcomes if o.error}),
        "other": sum(o.status not in (0, 200, 429) and o.status < 500 for o in outcomes),
        "ok_p50_ms": _ms(_pct(ok, 0.5)),
        "ok_p99_ms": _ms(_pct(ok, 0.99)),
        "refused_p50_ms": _ms(_pct([o.seconds for o in refused], 0.5)),
        "refused_p99_ms": _ms(_pct([o.seconds for o in refused], 0.99)),
        "refused_max_ms": _ms(max((o.seconds for o in refused), default=None)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def run_load(
    server: Server, body: dict, concurrency: int, capacity_s: float, factor: float, duration: float
) -> dict:
    """Warm-up, capacity, RSS, overload at ``factor`` x capacity, RSS, gauges: one result dict."""
    asyncio.run(closed_loop(server.url, body, concurrency, 1.0))  # warm-up (first forwards, pools)
    capacity, cap_outcomes = asyncio.run(closed_loop(server.url, body, concurrency, capacity_s))
    before = process_stats(server.pid)
    rate = factor * capacity
    peaks = GaugePeaks(server.url)
    t0 = time.perf_counter()
    with peaks:
        outcomes, schedule = asyncio.run(open_loop(server.url, body, rate, duration))
    elapsed = time.perf_counter() - t0
    after = process_stats(server.pid)
    return {
        "capacity_rps": round(capacity, 2),
        "capacity_phase": summarize(cap_outcomes),
        "offered_rps": round(rate, 2),
        **schedule,
        "overload_seconds": round(elapsed, 2),
        "overload": summarize(outcomes),
        "overload_gauge_peaks": peaks.peaks,  # the largest running / waiting seen while overloaded
        "server_before": before,
        "server_after": after,
        "gauges_after": gauges_idle(server.url),
    }


def print_table(result: dict) -> None:
    o = result["overload"]
    rss_before, rss_after = result["server_before"]["rss_mb"], result["server_after"]["rss_mb"]
    rows = [
        ("capacity (closed loop)", f"{result['capacity_rps']:.1f} req/s"),
        ("offered / sent (open loop)", f"{result['offered_rps']:.1f} / {result['sent_rps']:.1f} req/s"),
        ("client's max lag behind schedule", f"{result['max_send_lag_ms']} ms"),
        ("overload phase (until last answer)", f"{result['overload_seconds']:.1f} s"),
        ("sent / completed (200)", f"{o['sent']} / {o['completed']}"),
        ("completion tokens (mean, of a 200)", str(o["completion_tokens_mean"])),
        ("refused 429 (no Retry-After)", f"{o['refused_429']} ({o['refused_without_retry_after']})"),
        (
            "429 latency p50 / p99 / max ms",
            f"{o['refused_p50_ms']} / {o['refused_p99_ms']} / {o['refused_max_ms']}",
        ),
        (
            "5xx / transport errors / other",
            f"{o['server_errors_5xx']} / {o['transport_errors']} / {o['other']}",
        ),
        ("admitted latency p50 / p99 ms", f"{o['ok_p50_ms']} / {o['ok_p99_ms']}"),
        ("server RSS before / after MiB", f"{rss_before:.1f} / {rss_after:.1f}"),
        ("gauges after (running, waiting)", str(tuple(result["gauges_after"].values()))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight Llama server")
    ap.add_argument("--model", default=None, help="base model for python -m server (default SmolLM2)")
    ap.add_argument("--url", default=None, help="use a running server (with --pid for RSS)")
    ap.add_argument("--pid", type=int, default=None)
    ap.add_argument("--duration", type=float, default=60.0, help="overload seconds")
    ap.add_argument("--capacity-seconds", type=float, default=30.0)
    ap.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    ap.add_argument(
        "--concurrency", type=int, default=None, help="closed-loop clients (default batch+queue/2)"
    )
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (tiny) or 16")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of python -m server (1: on a shared 2-core machine 2 threads collapse "
        "to ~1 s a step whenever another process takes a core)",
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    # Tiny: long enough generations that 2x capacity stays within what one Python client can send.
    new_tokens = a.max_new_tokens or (128 if a.tiny else 16)
    # (SmolLM2 continues this one for 16+ tokens; a question may end at once with EOS)
    prompt = "t1 t2 t3 t4 t5 t6 t7 t8" if a.tiny else "Once upon a time, in a small village by the sea,"
    body = {"prompt": prompt, "max_new_tokens": new_tokens}
    concurrency = a.concurrency or a.max_batch_size + a.max_queue // 2
    server_args = ["--max-batch-size", str(a.max_batch_size), "--max-queue", str(a.max_queue)]
    if not a.tiny:  # the tiny server runs on one thread (tiny ops are slower on several)
        server_args += ["--threads", str(a.threads)]

    def go(server: Server) -> dict:
        return run_load(server, body, concurrency, a.capacity_seconds, a.factor, a.duration)

    if a.url:
        if a.pid is None:
            ap.error("--url needs --pid (the server process, for its RSS)")
        result = go(Server(a.url, a.pid))
    else:
        with launch(a.tiny, a.model, server_args) as server:
            result = go(server)
    result["meta"] = {
        "server": "tiny" if a.tiny else (a.model or "smollm2-135m-instruct"),
        "url_given": bool(a.url),
        "body": body,
        "concurrency": concurrency,
        "max_batch_size": a.max_batch_size,
        "max_queue": a.max_queue,
        "server_threads": 1 if a.tiny else a.threads,
        "factor": a.factor,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    print_table(result)
    out = a.out or RESULTS / ("load-tiny.json" if a.tiny else "load.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
