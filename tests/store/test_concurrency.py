"""Threads: re-uploads of one id serialise into versions 1..N; different ids and loads run alongside."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

from adapters_store import WEIGHTS_NAME, NotFound

from .helpers import FAMILIES, assert_consistent, upload


def test_concurrent_puts_of_one_id(store):
    n = 8
    uploads = [upload(FAMILIES[i % 5], seed=i) for i in range(n)]
    barrier = threading.Barrier(n)

    def put(i):
        barrier.wait()
        return i, store.put("hot", *uploads[i])

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(put, range(n)))
    versions = sorted(rec.version for _, rec in results)
    assert versions == list(range(1, n + 1))
    winner_i, winner = max(results, key=lambda r: r[1].version)
    current = store.get("hot")
    assert current == winner
    assert current.sha256 == hashlib.sha256(uploads[winner_i][1]).hexdigest()
    assert store.list() == ([current], 1)
    assert sorted(p.name for p in (store.root / "adapters" / "hot").iterdir()) == [f"v{n}"]
    assert hashlib.sha256(store.file_path("hot", WEIGHTS_NAME).read_bytes()).hexdigest() == current.sha256
    assert_consistent(store)


def test_mixed_traffic(store):
    for i in range(4):
        store.put(f"base-{i}", *upload(FAMILIES[i], seed=i))
    errors: list[BaseException] = []

    def writer(k):
        for j in range(3):
            store.put(f"w-{k}", *upload(FAMILIES[(k + j) % 5], seed=10 * k + j))

    def reader():
        for _ in range(6):
            for i in range(4):
                assert store.load(f"base-{i}").family == FAMILIES[i]

    def churn():
        for _ in range(3):
            store.put("churn", *upload())
            try:
                store.delete("churn")
            except NotFound:
                pass

    def run(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(writer, k)) for k in range(3)]
    threads += [threading.Thread(target=run, args=(reader,)) for _ in range(2)]
    threads += [threading.Thread(target=run, args=(churn,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [store.get(f"w-{k}").version for k in range(3)] == [3, 3, 3]
    assert store.current_version("churn") is None
    assert_consistent(store)
