"""The ``cold`` and ``kill`` scenarios of ``bench/cluster.py`` (issue 16's last two targets).

**cold**: what an adapter's first request on a replica adds to its time to first token, with the
store on S3. An upload writes the blobs to S3 and the row to the index and loads nothing: no
replica's read-through cache or residency holds a fresh adapter, whichever replica stored it.
Ray's router cannot be told which replica to use (the ingress keys a request by ``id@version``
only; a new id goes to the replica with the fewest), so every adapter's first request is the
cold case on the replica that serves it: an index read, both objects fetched from S3 into that
replica's cache, sha256 + validation, the host copy, the device install. The baseline is warm
requests of the same adapter on the same replica (``X-Facet-Replica`` checked). Samples served by
the replica that did *not* take the upload are reported apart (the "second replica").

Parts: the replica's store load (fetch + verify + validate, the
``facet_adapter_load_duration_seconds`` histogram's sum/count over the cold phase, per replica)
and the plain S3 GETs of both objects timed from here with boto3 (same loopback server).

**kill**: ``--concurrency`` streaming requests over the adapters for ``--duration`` s; after
``--kill-after`` s one engine replica's OS process gets SIGKILL. Every request ends in one of:
``done`` (its ``event: done``), an explicit error (an HTTP error status such as 503, or an
``event: error``), or *lost* (the stream ended without a final event, the connection broke, or
it hung past the timeout). A probe asks ``/ready`` every 0.25 s (any replica answers, with its
``X-Facet-Replica``) to time the replacement; afterwards every adapter is read back (version,
sha256, the downloaded weights' bytes) and generates.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPLICA = "x-facet-replica"
PROMPT = "Write a sentence about rivers."
REQUEST_TIMEOUT_S = 180.0  # a request longer than this counts as lost (hung)
METRICS_WAIT_S = 4.5  # replicas push /metrics every 2 s
PROBE_S = 0.25
LOST = ("truncated", "transport_error", "timeout")
EXPLICIT_ERRORS = ("error_status", "error_event")
LOAD_METRIC = re.compile(
    r'^facet_adapter_load_duration_seconds_(sum|count)\{.*replica="([^"]+)".*\}\s+(\S+)$'
)


@dataclass
class Outcome:
    """One streamed /generate: when, where, and how it ended (one of ``done``, EXPLICIT_ERRORS,
    LOST)."""

    adapter: str | None
    started: float
    ended: float = 0.0
    status: int | None = None
    replica: str | None = None
    ttft: float | None = None
    tokens: int = 0
    end: str | None = None
    detail: str = ""


async def stream_generate(
    client: httpx.AsyncClient, adapter_id: str | None, max_new_tokens: int, origin: float = 0.0
) -> Outcome:
    """Stream one greedy generation; times are seconds since ``origin`` (perf_counter)."""
    body = {"prompt": PROMPT, "adapter": adapter_id, "max_new_tokens": max_new_tokens}
    start = time.perf_counter()
    out = Outcome(adapter_id, start - origin)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream(
                "POST", "/generate", json={**body, "stream": True, "temperature": 0.0}
            ) as r:
                out.status, out.replica = r.status_code, r.headers.get(REPLICA)
                if r.status_code != 200:
                    out.end, out.detail = "error_status", (await r.aread())[:300].decode("utf-8", "replace")
                    return out
                await _read_events(r, out, start)
        if out.end is None:
            out.end = "truncated"
    except TimeoutError:
        out.end = out.end or "timeout"
    except httpx.HTTPError as exc:
        if out.end is None:
            out.end, out.detail = "transport_error", repr(exc)[:300]
    finally:
        out.ended = time.perf_counter() - origin
    return out


async def _read_events(response: httpx.Response, out: Outcome, start: float) -> None:
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "token":
            if out.ttft is None:
                out.ttft = time.perf_counter() - start
            out.tokens += 1
        elif line.startswith("data:") and event in ("done", "error"):
            out.end = "done" if event == "done" else "error_event"
            if event == "error":
                out.detail = line[5:].strip()[:300]
        elif not line:
            event = None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


# ---- cold ---------------------------------------------------------------------------------------
async def load_seconds(client: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    """Per replica: (sum, count) of its adapter store loads, from the ingress's merged /metrics."""
    text = (await client.get("/metrics")).text
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = LOAD_METRIC.match(line)
        if m:
            found.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return {r: (v.get("sum", 0.0), v.get("count", 0.0)) for r, v in found.items()}


def s3_get_seconds(stack, stored: dict[str, dict]) -> list[float]:
    """Seconds to GET both objects of each adapter's version from the S3 server, from here."""
    if stack.s3_endpoint is None:
        return []
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1")
    times = []
    for adapter_id, info in stored.items():
        start = time.perf_counter()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            key = f"facet/adapters/{adapter_id}/v{info['version']}/{name}"
            s3.get_object(Bucket=stack.s3_bucket, Key=key)["Body"].read()
        times.append(time.perf_counter() - start)
    return times


async def cold(args, stack, files: dict) -> dict:
    from bench.cluster import upload_all

    async with httpx.AsyncClient(base_url=stack.url, timeout=REQUEST_TIMEOUT_S) as client:
        stored = await upload_all(client, files)
        for _ in range(4):  # the base model's path on the replicas (no adapter)
            await stream_generate(client, None, args.max_new_tokens)
        await asyncio.sleep(METRICS_WAIT_S)
        loads_before = await load_seconds(client)
        samples = []
        for adapter_id in files:
            first = await stream_generate(client, adapter_id, args.max_new_tokens)
            await asyncio.sleep(1.0)  # the replica reports the new multiplex id to the router
            warm = [
                await stream_generate(client, adapter_id, args.max_new_tokens)
                for _ in range(args.warm_requests)
            ]
            samples.append(cold_sample(adapter_id, stored[adapter_id], first, warm))
        await asyncio.sleep(METRICS_WAIT_S)
        loads_after = await load_seconds(client)
    return summarise_cold(samples, store_loads(loads_before, loads_after), s3_get_seconds(stack, stored))


def cold_sample(adapter_id: str, stored: dict, first: Outcome, warm: list[Outcome]) -> dict:
    """One adapter: its first request's TTFT against the median warm TTFT on the same replica."""
    ok = first.end == "done" and first.ttft is not None
    same = [w.ttft for w in warm if w.end == "done" and w.replica == first.replica and w.ttft is not None]
    warm_ttft = p50(same)
    return {
        "adapter": adapter_id,
        "uploaded_on": stored["replica"],
        "served_on": first.replica,
        "second_replica": first.replica != stored["replica"],
        "cold_ttft_ms": ms(first.ttft) if ok else None,
        "warm_ttft_ms": ms(warm_ttft),
        "warm_elsewhere": sum(w.replica != first.replica for w in warm),
        "added_ms": ms(first.ttft - warm_ttft) if ok and warm_ttft is not None else None,
        "end": first.end,
    }


def store_loads(before: dict, after: dict) -> dict[str, dict]:
    """Per replica: the store loads of the cold phase (count, mean ms)."""
    out = {}
    for replica, (total, count) in after.items():
        total0, count0 = before.get(replica, (0.0, 0.0))
        if count > count0:
            out[replica] = {"loads": int(count - count0), "mean_ms": ms((total - total0) / (count - count0))}
    return out


def summarise_cold(samples: list[dict], loads: dict, s3_times: list[float]) -> dict:
    added = [s["added_ms"] for s in samples if s["added_ms"] is not None]
    second = [s["added_ms"] for s in samples if s["added_ms"] is not None and s["second_replica"]]
    total_loads = sum(v["loads"] for v in loads.values())
    load_mean = (
        round(sum(v["loads"] * v["mean_ms"] for v in loads.values()) / total_loads, 1)
        if total_loads
        else None
    )
    added_p50 = p50(added)
    return {
        "adapters": len(samples),
        "added_ttft_p50_ms": added_p50,
        "added_ttft_p50_ms_second_replica": p50(second),
        "second_replica_samples": len(second),
        "cold_ttft_p50_ms": p50([s["cold_ttft_ms"] for s in samples if s["cold_ttft_ms"] is not None]),
        "warm_ttft_p50_ms": p50([s["warm_ttft_ms"] for s in samples if s["warm_ttft_ms"] is not None]),
        "added_ttft_max_ms": max(added) if added else None,
        "target_ms": 100.0,
        "target_met": added_p50 is not None and added_p50 <= 100.0,
        "parts": {
            "store_load_mean_ms": load_mean,
            "store_loads_per_replica": loads,
            "s3_get_both_objects_p50_ms": ms(p50(s3_times)),
            "rest_ms (added p50 - store load mean: device install, routing)": (
                round(added_p50 - load_mean, 1) if added_p50 is not None and load_mean is not None else None
            ),
        },
        "samples": samples,
    }


# ---- kill ---------------------------------------------------------------------------------------
def replica_pids(stack) -> list[int]:
    """OS processes of the engine replicas (Ray titles an actor's worker ``ray::<class>``; a Serve
    replica's class is ``ServeReplica:<app>:FacetEngine``); under this run's cluster when it
    started one, else on the whole machine."""
    pids = stack.descendants() if stack.cluster_pid is not None else {int(p.name) for p in _procs()}
    found = []
    for pid in sorted(pids):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if "ServeReplica" in title and "FacetEngine" in title:
            found.append(pid)
    return found


def _procs():
    return (p for p in Path("/proc").iterdir() if p.name.isdigit())


class Probe:
    """``GET /ready`` every PROBE_S: (t, status, replica) samples, t since the load's origin."""

    def __init__(self, url: str, origin: float):
        self.url, self.origin = url, origin
        self.samples: list[tuple[float, int | None, str | None]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                t = time.perf_counter() - self.origin
                try:
                    r = await client.get("/ready")
                    self.samples.append((t, r.status_code, r.headers.get(REPLICA)))
                except httpx.HTTPError:
                    self.samples.append((t, None, None))
                await asyncio.sleep(PROBE_S)

    def newcomer_at(self, known: set[str]) -> float | None:
        """When a replica not in ``known`` first answered /ready with 200."""
        return next((t for t, s, r in self.samples if s == 200 and r and r not in known), None)


async def run_load(
    client: httpx.AsyncClient, ids: list[str], args, origin: float, seconds: float, into: list
):
    """``args.concurrency`` streams back to back over ``ids`` (round-robin) for ``seconds``."""
    stop = time.perf_counter() + seconds

    async def worker(first: int) -> None:
        n = first
        while time.perf_counter() < stop:
            o = await stream_generate(client, ids[n % len(ids)], args.max_new_tokens, origin)
            into.append(o)
            n += args.concurrency
            if o.end != "done":
                await asyncio.sleep(0.2)  # no tight loop on refusals while a replica is away

    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))


async def kill(args, stack, files: dict) -> dict:
    from bench.cluster import upload_all

    ids = list(files)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=stack.url, timeout=timeout, limits=limits) as client:
        stored = await upload_all(client, files)
        for adapter_id in ids:  # warm-up: each adapter lands on a replica
            await stream_generate(client, adapter_id, 1)
        await asyncio.sleep(1.0)
        origin = time.perf_counter()
        probe = Probe(stack.url, origin)
        probing = asyncio.create_task(probe.run())
        outcomes: list[Outcome] = []
        loading = asyncio.create_task(run_load(client, ids, args, origin, args.duration, outcomes))
        await asyncio.sleep(args.kill_after)
        before = {o.replica for o in outcomes if o.replica} | {r for _, _, r in probe.samples if r}
        victim = sigkill_replica(args, stack)
        killed_at = time.perf_counter() - origin
        await loading
        recovered_at = await wait_for_newcomer(probe, before, args.recovery_timeout)
        if recovered_at is not None and args.after_duration > 0:  # does the replacement take load?
            await run_load(client, ids, args, origin, args.after_duration, outcomes)
        await asyncio.sleep(2.0)
        probe.stop.set()
        await probing
        intact = await check_adapters(client, stored)
    return summarise_kill(args, outcomes, probe, before, victim, killed_at, recovered_at, intact)


def sigkill_replica(args, stack) -> dict:
    pids = replica_pids(stack)
    if args.victim_pid is None and len(pids) < 2:
        raise SystemExit(f"found {len(pids)} engine replica processes ({pids}); pass --victim-pid")
    pid = args.victim_pid or pids[0]
    os.kill(pid, signal.SIGKILL)
    return {"pid": pid, "replica_processes_before": pids}


async def wait_for_newcomer(probe: Probe, known: set[str], timeout: float) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        at = probe.newcomer_at(known)
        if at is not None:
            return at
        await asyncio.sleep(0.5)
    return None


async def check_adapters(client: httpx.AsyncClient, stored: dict[str, dict]) -> dict:
    """Every uploaded adapter afterwards: same version and sha256 in the index, byte-identical
    weights on download, and a generation at that version."""
    bad, served_by = {}, []
    for adapter_id, info in stored.items():
        meta = await client.get(f"/adapters/{adapter_id}")
        blob = await client.get(f"/adapters/{adapter_id}/files/adapter_model.safetensors")
        gen = await client.post(
            "/generate", json={"prompt": PROMPT, "adapter": adapter_id, "max_new_tokens": 2}
        )
        problems = []
        if meta.status_code != 200 or meta.json().get("version") != info["version"]:
            problems.append(f"GET {meta.status_code} {meta.text[:120]}")
        elif meta.json().get("sha256") != info["sha256"]:
            problems.append("index sha256 differs")
        if blob.status_code != 200 or hashlib.sha256(blob.content).hexdigest() != info["sha256"]:
            problems.append(f"download {blob.status_code}, bytes differ or missing")
        if gen.status_code != 200 or gen.json().get("adapter_version") != info["version"]:
            problems.append(f"generate {gen.status_code} {gen.text[:120]}")
        else:
            served_by.append(gen.headers.get(REPLICA))
        if problems:
            bad[adapter_id] = problems
    return {
        "adapters": len(stored),
        "intact": len(stored) - len(bad),
        "problems": bad,
        "served_by": served_by,
    }


def summarise_kill(args, outcomes, probe, before, victim, killed_at, recovered_at, intact) -> dict:
    ends = {k: sum(o.end == k for o in outcomes) for k in ("done", *EXPLICIT_ERRORS, *LOST)}
    lost = [asdict(o) for o in outcomes if o.end in LOST]
    errors = [o for o in outcomes if o.end in EXPLICIT_ERRORS]
    after = {r for t, s, r in probe.samples if recovered_at is not None and t >= recovered_at and s == 200}
    after |= {r for r in intact["served_by"] if r}
    killed = sorted(before - after) if recovered_at is not None else []

    later = [o for o in outcomes if recovered_at is not None and o.started >= recovered_at]
    # after recovery: from the first request that started then to the last end (the load may
    # have paused while the bench waited for the replacement)
    load_after = Counter(o.replica for o in later)
    span = (min(o.started for o in later), max(o.ended for o in later)) if later else (0.0, 0.0)

    def rate(lo: float, hi: float) -> float | None:
        done = [o for o in outcomes if o.end == "done" and lo <= o.ended < hi]
        return round(sum(o.tokens for o in done) / (hi - lo), 1) if hi > lo else None

    return {
        "adapters": intact["adapters"],
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "duration_s": args.duration,
        "requests": len(outcomes),
        "ends": ends,
        "lost": len(lost),
        "target_met": not lost and recovered_at is not None and intact["intact"] == intact["adapters"],
        "killed": {**victim, "at_s": round(killed_at, 2), "replica": killed},
        "explicit_errors": [
            {"at_s": round(o.ended, 2), "end": o.end, "status": o.status, "detail": o.detail[:160]}
            for o in errors
        ],
        "lost_requests": lost,
        "replicas_before_kill": sorted(before),
        "recovery_s": round(recovered_at - killed_at, 2) if recovered_at is not None else None,
        "replicas_after_recovery": sorted(after),
        "load_requests_per_replica_after_recovery": dict(load_after),
        "probe_failures": sum(s != 200 for _, s, _ in probe.samples),
        "tokens_per_s": {
            "before_kill": rate(0.0, killed_at),
            "kill_to_recovery": rate(killed_at, recovered_at) if recovered_at else None,
            "after_recovery": rate(*span) if later else None,
        },
        "adapter_data": intact,
    }
