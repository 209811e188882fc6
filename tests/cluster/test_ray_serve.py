"""The Ray Serve application with 2 tiny-model replicas on one shared store (docs/scale-out.md).

Through the ingress (HTTP on loopback) and, to reach a chosen replica, through the engine
deployment's handle: unkeyed calls land on either replica, so a test repeats one until both
replicas have answered.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.api.conftest import sse_json

from .conftest import ADMIN, INFER_KEY, Cluster

REPLICA = "x-facet-replica"
PROMPT = {"prompt": "hello world", "max_new_tokens": 4, "temperature": 0.0}


def upload(c: Cluster, adapter_id: str, files: tuple[bytes, bytes]):
    config, weights = files
    response = c.client.post(
        "/adapters",
        data={"adapter_id": adapter_id},
        files={"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)},
    )
    assert response.status_code in (200, 201), response.text
    return response


def generate(c: Cluster, adapter_id: str | None, **extra):
    response = c.client.post("/generate", json={**PROMPT, "adapter": adapter_id, **extra})
    assert response.status_code == 200, response.text
    return response


def replica_call(c: Cluster, method: str, path: str, body: dict | None = None, model_id: str | None = None):
    """One call straight to the engine deployment: (replica id, status, body bytes)."""
    options = {"stream": True} | ({"multiplexed_model_id": model_id} if model_id else {})
    call = {
        "method": method,
        "path": path,
        "headers": [("content-type", "application/json"), *ADMIN.items()],
        "body": json.dumps(body).encode() if body is not None else b"",
    }
    head, chunks = None, []
    for item in c.engine.options(**options).handle_http.remote(call):
        if isinstance(item, dict):
            head = item
        else:
            chunks.append(item)
    headers = {k.lower(): v for k, v in head["headers"]}
    return headers[REPLICA], head["status"], b"".join(chunks)


def on_both_replicas(c: Cluster, method: str, path: str, body: dict | None = None, tries: int = 60) -> dict:
    """{replica id: (status, body)} from unkeyed calls until two replicas have answered."""
    seen: dict = {}
    for _ in range(tries):
        replica, status, data = replica_call(c, method, path, body)
        seen.setdefault(replica, (status, data))
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {list(seen)} answered {tries} unkeyed calls")


def describe_replicas(c: Cluster, tries: int = 60) -> dict[str, dict]:
    """{replica id: describe()} of the replicas that answered unkeyed calls (stops at two)."""
    seen: dict = {}
    for _ in range(tries):
        info = c.engine.describe.remote().result()
        seen[info["replica"]] = info
        if len(seen) == 2:
            break
    return seen


def describe_both(c: Cluster, tries: int = 60) -> dict[str, dict]:
    seen = describe_replicas(c, tries)
    assert len(seen) == 2, f"only replicas {list(seen)} answered"
    return seen


# ------------------------------------------------------------------------------------------ tests


def test_replica_header_on_json_and_streamed_responses(ray_cluster: Cluster):
    c = ray_cluster
    response = generate(c, None)
    assert response.headers[REPLICA]
    assert response.json()["usage"]["completion_tokens"] == 4
    with c.client.stream("POST", "/generate", json={**PROMPT, "adapter": None, "stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers[REPLICA]
        text = "".join(stream.iter_text())
    events = sse_json(text)
    assert [name for name, _ in events] == ["token"] * 4 + ["done"], text
    replicas = set(describe_both(c))
    assert response.headers[REPLICA] in replicas and stream.headers[REPLICA] in replicas
    assert c.client.get("/adapters/nope").headers[REPLICA] in replicas  # errors too


def test_keys_are_checked_at_the_ingress_and_scopes_on_the_replica(ray_cluster: Cluster):
    c = ray_cluster
    bare = {"authorization": ""}
    response = c.client.post("/generate", json={**PROMPT, "adapter": None}, headers=bare)
    assert response.status_code == 401 and REPLICA not in response.headers  # refused at the ingress
    assert c.client.get("/health", headers=bare).status_code == 200  # open, as on one process
    infer = {"authorization": f"Bearer {INFER_KEY}"}
    assert c.client.post("/generate", json={**PROMPT, "adapter": None}, headers=infer).status_code == 200
    assert c.client.get("/metrics", headers=infer).status_code == 403
    scoped = c.client.get("/adapters", headers=infer)  # admin scope, checked by the replica
    assert scoped.status_code == 403 and scoped.headers[REPLICA]
    assert scoped.json()["error"]["type"] == "forbidden"


def test_same_adapter_same_replica_after_warm_up(ray_cluster: Cluster, make_adapter):
    c = ray_cluster
    ids = [f"aff-{i}" for i in range(3)]  # fewer than the per-replica LRU: nothing is evicted
    for i, adapter_id in enumerate(ids):
        upload(c, adapter_id, make_adapter(10 + i))
        generate(c, adapter_id)  # warm-up: the first request loads it on some replica
    page = c.client.get("/adapters", params={"offset": 1, "limit": 1}).json()  # the query string travels
    assert (page["offset"], page["limit"], len(page["adapters"])) == (1, 1, 1) and page["total"] >= 3
    time.sleep(1.0)  # the replicas report their multiplexed ids to the router
    served: dict[str, Counter] = {a: Counter() for a in ids}
    for _ in range(20):
        for adapter_id in ids:
            response = generate(c, adapter_id)
            assert response.json()["adapter_version"] == 1
            served[adapter_id][response.headers[REPLICA]] += 1
    total = sum(sum(n.values()) for n in served.values())
    on_home = sum(n.most_common(1)[0][1] for n in served.values())
    assert on_home / total >= 0.95, served


def test_upload_through_one_replica_is_served_by_both_and_a_new_version_everywhere(
    ray_cluster: Cluster, make_adapter
):
    c = ray_cluster
    upload(c, "shared-a", make_adapter(1))
    body = {**PROMPT, "adapter": "shared-a"}
    v1 = on_both_replicas(c, "POST", "/generate", body)  # both load version 1
    answers = [json.loads(data) for status, data in v1.values() if status == 200]
    assert len(answers) == 2 and {a["adapter_version"] for a in answers} == {1}
    assert answers[0]["text"] == answers[1]["text"]  # one store, one adapter, greedy

    uploader = upload(c, "shared-a", make_adapter(2)).headers[REPLICA]  # version 2 via one replica
    v2 = on_both_replicas(c, "POST", "/generate", body)
    assert uploader in v2
    answers = {r: json.loads(data) for r, (status, data) in v2.items()}
    assert {a["adapter_version"] for a in answers.values()} == {2}, answers  # the other one too
    assert len({a["text"] for a in answers.values()}) == 1

    # Through the ingress the version is part of the multiplex id: the new id is resident where
    # the ingress sent the request, and the old one is no longer requested.
    response = generate(c, "shared-a")
    assert response.json()["adapter_version"] == 2
    info = {r: i for r, i in describe_both(c).items()}
    assert "shared-a@2" in info[response.headers[REPLICA]]["resident"]

    assert c.client.delete("/adapters/shared-a").status_code == 200
    gone = on_both_replicas(c, "POST", "/generate", body)
    assert {status for status, _ in gone.values()} == {404}


def test_lru_eviction_per_replica(ray_cluster: Cluster):
    c = ray_cluster
    routed: dict[str, list[str]] = {}
    for i in range(8):
        model_id = f"lru-{i}"
        replica, status, _ = replica_call(c, "GET", "/health", model_id=model_id)
        assert status == 200
        routed.setdefault(replica, []).append(model_id)
    info = describe_both(c)
    cap = c.cluster.max_adapters_per_replica
    for replica, ids in routed.items():
        resident = [m for m in info[replica]["resident"] if m.startswith("lru-")]
        assert len(info[replica]["resident"]) <= cap
        assert resident == ids[-len(resident) :] if resident else True, (ids, info[replica])
        if len(ids) >= cap:
            assert resident == ids[-cap:], (ids, info[replica])  # older ids went first
        if len(ids) > cap:
            assert set(ids[: len(ids) - cap]) <= set(info[replica]["evicted"])
    # An evicted id is loaded again where the router sends it, as that replica's newest.
    replica, status, _ = replica_call(c, "GET", "/health", model_id="lru-0")
    assert status == 200
    assert describe_both(c)[replica]["resident"][-1] == "lru-0"


def test_a_saturated_replica_spills_over(ray_cluster: Cluster, make_adapter):
    """One adapter, more concurrent streams than its replica's max_ongoing_requests (batch 4 + 4):
    the router sends the rest to the other replica instead of queueing them all on the holder."""
    c = ray_cluster
    upload(c, "hot", make_adapter(21))
    generate(c, "hot")
    time.sleep(1.0)
    body = {**PROMPT, "adapter": "hot", "max_new_tokens": 200, "stream": True}

    def one(_) -> str:
        with httpx.Client(base_url=c.url, headers=ADMIN, timeout=120) as client:
            with client.stream("POST", "/generate", json=body) as stream:
                assert stream.status_code == 200
                "".join(stream.iter_text())
                return stream.headers[REPLICA]

    with ThreadPoolExecutor(max_workers=16) as pool:
        replicas = Counter(pool.map(one, range(16)))
    assert len(replicas) == 2, replicas


def test_job_routes_stay_on_one_replica(ray_cluster: Cluster):
    """Job routes carry one fixed multiplex id: after the first (which loads it on a replica and
    is reported to the router) they all land on the replica holding it."""
    c = ray_cluster
    c.client.get("/files")
    time.sleep(1.0)
    replicas = [c.client.get("/files").headers[REPLICA] for _ in range(10)]
    replicas += [c.client.get("/fine-tunes").headers[REPLICA] for _ in range(5)]
    assert len(set(replicas)) == 1, replicas
    holders = [i["replica"] for i in describe_both(c).values() if i["holds_jobs"]]
    assert replicas[0] in holders


def test_metrics_carry_a_replica_label(ray_cluster: Cluster):
    c = ray_cluster
    replicas = set(describe_both(c))
    deadline = time.monotonic() + 30
    while True:
        text = c.client.get("/metrics").text
        labelled = {r for r in replicas if f'replica="{r}"' in text}
        if labelled == replicas or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert labelled == replicas, text[:2000]
    assert text.count("# TYPE facet_ready ") <= 1  # one family header for all replicas


def _cancelled(metrics_text: bytes) -> float:
    for line in metrics_text.decode().splitlines():
        if line.startswith('facet_generation_requests_total{finish_reason="cancelled"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no cancelled-generations series in /metrics")


def test_client_disconnect_cancels_the_replicas_generation(ray_cluster: Cluster):
    """A stream closed after its first token ends as ``cancelled`` on the replica that served it.
    The hold file makes that replica wait for a cancel after the first token, so the stream
    cannot win the race by finishing first (tiny_factory.hold_until_cancelled)."""
    c = ray_cluster
    body = {**PROMPT, "adapter": None, "max_new_tokens": 240, "stream": True}
    before = {r: _cancelled(data) for r, (_, data) in on_both_replicas(c, "GET", "/metrics").items()}
    c.hold_file.touch()
    try:
        with c.client.stream("POST", "/generate", json=body) as stream:
            replica = stream.headers[REPLICA]
            next(line for line in stream.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen, _, data = replica_call(c, "GET", "/metrics")
            if seen == replica and _cancelled(data) > before[replica]:
                return
            time.sleep(0.1)
    finally:
        c.hold_file.unlink()
    raise AssertionError("the disconnected stream was not cancelled on its replica")


def test_killed_replica_recovers_without_losing_adapters(ray_cluster: Cluster, make_adapter):
    import ray

    c = ray_cluster
    upload(c, "durable", make_adapter(7))
    home = generate(c, "durable").headers[REPLICA]
    before = set(describe_both(c))
    victim = _replica_actor(home)
    ray.kill(victim, no_restart=True)
    deadline = time.monotonic() + 90
    while True:  # requests keep being answered (by the survivor) while the replica comes back
        response = c.client.post("/generate", json={**PROMPT, "adapter": "durable"})
        now = set(describe_replicas(c, tries=20))
        if response.status_code == 200 and len(now - before) == 1:
            break
        assert time.monotonic() < deadline, (response.status_code, now, before)
        time.sleep(0.5)
    assert home not in now
    assert response.json()["adapter_version"] == 1
    assert c.client.get("/adapters/durable").json()["version"] == 1
    served = on_both_replicas(c, "POST", "/generate", {**PROMPT, "adapter": "durable"})
    assert {json.loads(data)["adapter_version"] for _, data in served.values()} == {1}


def _replica_actor(replica_id: str):
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith("SERVE_REPLICA::") and entry["name"].endswith(replica_id):
            return ray.get_actor(entry["name"], namespace=entry["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")
