"""One contract, every backend pair: blob stores {local files, a real S3-compatible server (moto,
started here on loopback)} x indexes {SQLite, a real PostgreSQL started here with initdb/pg_ctl}.

The servers start once per session (``conftest.py``: ``s3_endpoint``, ``pg_server``); each test
gets a fresh bucket and database. Without ``initdb`` or ``moto_server`` the PostgreSQL/S3 cases
fail, saying what to install (they are not skipped). The crash tests kill a subprocess with
``os._exit(9)`` at each ``_fault_point`` of put.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest

import adapters_store.store as store_mod
from adapters_store import WEIGHTS_NAME, Conflict, Corrupt, NotFound
from adapters_store.backends import BlobExists, BlobMissing, blob_key, version_prefix
from adapters_store.index import Row

from . import backend_servers as servers
from .helpers import FAMILIES, upload

BLOBS = ["local", "s3"]
INDEXES = ["sqlite", "postgres"]
PAIRS = [(b, i) for b in BLOBS for i in INDEXES]


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def spec(request, tmp_path):
    blob, index = request.param
    spec = {"root": str(tmp_path / "store"), "blob": blob, "index": index}
    if blob == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        spec |= {"endpoint": endpoint, "bucket": servers.new_bucket(endpoint)}
    if index == "postgres":
        spec["dsn"] = servers.new_database(request.getfixturevalue("pg_server"))
    return spec


@pytest.fixture
def open_store(spec):
    """Open (or reopen: a restart, another replica) a store on the test's backends."""
    opened = []

    def _open(**kwargs):
        store = servers.open_store(spec, **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


def blob_keys(store) -> set[str]:
    return {i.key for i in store.blobs.list("adapters/")}


def assert_whole(store) -> None:
    """Every row is ready, loads, and its blobs match; no other blob exists under ``adapters/``."""
    records, total = store.list(0, 1000)
    assert total == len(records)
    expected = set()
    for rec in records:
        assert rec.status == "ready", rec
        assert store.load(rec.adapter_id, rec.version).family == rec.family
        data = store.blobs.get(blob_key(rec.adapter_id, rec.version, WEIGHTS_NAME), rec.nbytes)
        assert hashlib.sha256(data).hexdigest() == rec.sha256
        expected |= {blob_key(rec.adapter_id, rec.version, n) for n in ("adapter_config.json", WEIGHTS_NAME)}
    assert blob_keys(store) == expected


# ---- the blob store's own contract ---------------------------------------------------------------
def test_blob_put_is_a_conditional_create(open_store):
    blobs = open_store().blobs
    key = "adapters/raw/v1/adapter_config.json"
    blobs.put(key, b"first")
    with pytest.raises(BlobExists):
        blobs.put(key, b"second")
    assert blobs.get(key, 100) == b"first"
    assert blobs.get(key, 2) == b"fir"  # max_bytes + 1: the caller sees "too large"
    assert blobs.exists(key) and not blobs.exists("adapters/raw/v2/adapter_config.json")
    with pytest.raises(BlobMissing):
        blobs.get("adapters/raw/v2/adapter_config.json", 100)
    blobs.put("adapters/raw/v2/adapter_config.json", b"")
    assert blobs.get("adapters/raw/v2/adapter_config.json", 10) == b""
    assert {i.key for i in blobs.list("adapters/raw/v1/")} == {key}
    assert len(list(blobs.list("adapters/raw/"))) == 2
    blobs.delete(key)
    blobs.delete(key)  # missing is fine
    assert not blobs.exists(key)
    blobs.delete_prefix("adapters/raw/v2/")
    assert list(blobs.list("adapters/")) == []


@pytest.mark.parametrize("mode", ["native", "emulate"])
def test_s3_conditional_modes_refuse_a_second_put(s3_endpoint, mode):
    from adapters_store.blobs_s3 import S3BlobStore

    blobs = S3BlobStore(servers.new_bucket(s3_endpoint), "p", endpoint_url=s3_endpoint, conditional=mode)
    assert blobs.conditional_put == ("native" if mode == "native" else "emulated")
    blobs.put("adapters/x/v1/adapter_config.json", b"one")
    with pytest.raises(BlobExists):
        blobs.put("adapters/x/v1/adapter_config.json", b"two")
    assert blobs.get("adapters/x/v1/adapter_config.json", 10) == b"one"
    assert [i.key for i in blobs.list("")] == ["adapters/x/v1/adapter_config.json"]  # probe removed


# ---- the store on each pair ----------------------------------------------------------------------
def test_put_get_list_delete(open_store):
    store = open_store()
    recs = [store.put(f"a-{f}", *upload(f, seed=i)) for i, f in enumerate(FAMILIES)]
    recs.sort(key=lambda r: r.adapter_id)  # the list is ordered by id
    assert store.list(0, 2) == (recs[:2], len(FAMILIES))
    assert store.list(2, 100) == (recs[2:], len(FAMILIES))
    assert store.total_bytes() == sum(r.nbytes for r in recs)
    for rec in recs:
        assert store.get(rec.adapter_id) == rec
        assert store.load(rec.adapter_id, 1).family == rec.family
        assert hashlib.sha256(store.file_path(rec.adapter_id, WEIGHTS_NAME).read_bytes()).hexdigest() == (
            rec.sha256
        )
    v2 = store.put("a-lora", *upload("dct", seed=9))
    assert (v2.version, v2.family) == (2, "dct")
    assert store.delete("a-hut") == next(r for r in recs if r.adapter_id == "a-hut")
    with pytest.raises(NotFound):
        store.load("a-hut")
    assert_whole(store)

    again = open_store()  # a restart, or a second replica on the same shared store
    assert again.list(0, 100)[0] == store.list(0, 100)[0]
    assert again.open_report.orphans_removed == 0 and not again.open_report.degraded
    assert_whole(again)


def test_versions_are_immutable(open_store, monkeypatch):
    store = open_store()
    v1 = store.put("imm", *upload("lora", seed=1))
    before = {k: store.blobs.get(k, 1 << 20) for k in blob_keys(store)}
    staged = store.blobs.new_stage()
    store.blobs.stage(staged, {"adapter_config.json": b"{}", WEIGHTS_NAME: b"x"})
    with pytest.raises(BlobExists):
        store.blobs.publish(staged, version_prefix("imm", 1))
    store.blobs.discard(staged)
    # An index that hands out a used number again (it must not): the put is refused and the
    # stored version keeps its bytes.
    monkeypatch.setattr(store.index, "allocate_version", lambda adapter_id: 1)
    with pytest.raises(Conflict):
        store.put("imm", *upload("hut", seed=2))
    monkeypatch.undo()
    assert {k: store.blobs.get(k, 1 << 20) for k in blob_keys(store)} == before
    assert store.get("imm") == v1 and store.load("imm").family == "lora"
    assert store.put("imm", *upload("hut", seed=2)).version == 2


def test_deletes_are_tombstones(open_store):
    store = open_store()
    store.put("gone", *upload())
    store.put("gone", *upload("hut"))
    store.delete("gone")
    assert store.index.tombstones() == {"gone": 2}
    assert store.current_version("gone") is None
    assert blob_keys(store) == set()
    with pytest.raises(NotFound):
        store.delete("gone")
    assert store.put("gone", *upload("dct")).version == 3  # the number is never reused
    assert open_store().index.tombstones() == {"gone": 2}


def test_gc_removes_orphans_and_spares_young_ones(open_store):
    store = open_store()
    live = store.put("live", *upload("lora", seed=1))
    store.put("dead", *upload("hut", seed=2))
    row = store.index.get("dead")
    store.index.delete("dead")  # a tombstone, its blobs still there (a crash before their removal)
    for key in (
        blob_key("live", 1 + live.version, WEIGHTS_NAME),  # a crashed re-upload
        blob_key("fresh", 1, WEIGHTS_NAME),  # a crashed first upload
        blob_key("dead", row.version, "adapter_config.json") + ".extra",  # under a tombstoned version
    ):
        store.blobs.put(key, b"orphan")
    report = store.gc(grace_s=3600)  # the two un-committed ones may be puts in flight elsewhere
    assert (report.removed, report.young) == (1, 2)
    assert not any(k.startswith("adapters/dead/") for k in blob_keys(store))
    report = store.gc(grace_s=0)
    assert (report.removed, report.young) == (2, 0)
    assert_whole(store)


def test_gc_never_removes_a_row_committed_meanwhile(open_store):
    """The GC reads each id's row under the id lock: a put that committed after the collector
    listed the blobs keeps its blobs."""
    store = open_store()
    real_list = store.blobs.list

    def list_then_put(prefix):
        listing = list(real_list(prefix))
        store.put("late", *upload("surm"))  # commits v1 after the listing was taken
        return iter(listing + list(real_list(prefix)))

    store.blobs.list = list_then_put
    try:
        store.gc(grace_s=0)
    finally:
        del store.blobs.list
    assert store.load("late").family == "surm"
    assert_whole(store)


def test_gc_waits_for_a_put_between_its_blobs_and_its_row(open_store, monkeypatch):
    """A put of this process that published its blobs before the collector listed them, and
    commits its row after: the collector reads the row under the id lock, so it keeps them."""
    store = open_store()
    published, listed = threading.Event(), threading.Event()

    def hold_after_publishing(stage):
        if stage == "renamed" and threading.current_thread().name == "putter":
            published.set()
            assert listed.wait(60)

    monkeypatch.setattr(store_mod, "_fault_point", hold_after_publishing)
    real_list = store.blobs.list

    def list_and_tell(prefix):
        listing = list(real_list(prefix))
        listed.set()  # the put may commit from here on
        return iter(listing)

    store.blobs.list = list_and_tell
    putter = threading.Thread(target=store.put, args=("late", *upload("surm")), name="putter")
    putter.start()
    try:
        assert published.wait(60)
        report = store.gc(grace_s=0)
    finally:
        listed.set()
        putter.join(60)
        del store.blobs.list
    assert report.removed == 0
    assert store.load("late").family == "surm"
    assert_whole(store)


# ---- the read-through cache (remote blob stores) -------------------------------------------------
@pytest.fixture(params=["postgres", "sqlite"])
def s3_spec(request, tmp_path, s3_endpoint):
    spec = {"root": str(tmp_path / "store"), "blob": "s3", "index": request.param}
    spec |= {"endpoint": s3_endpoint, "bucket": servers.new_bucket(s3_endpoint)}
    if request.param == "postgres":
        spec["dsn"] = servers.new_database(request.getfixturevalue("pg_server"))
    return spec


def test_cache_is_bounded_in_bytes(s3_spec):
    size = len(upload()[1])
    bound = int(size * 2.5)  # two weights files and their configs fit, three do not
    with servers.open_store(s3_spec, cache_bytes=bound) as store:
        recs = [store.put(f"c{i}", *upload("lora", seed=i)) for i in range(4)]
        for _ in range(2):
            for rec in recs:
                assert store.load(rec.adapter_id).family == "lora"
                assert store.cache.total_bytes <= bound
        assert store.cache.evictions > 0 and store.cache.misses > 4
        files = [p for p in store.cache.folder.iterdir() if not p.name.startswith(".")]
        assert sum(p.stat().st_size for p in files) == store.cache.total_bytes <= bound
        assert store.load("c3").family == "lora"
        hits = store.cache.hits
        assert store.load("c3").family == "lora"
        assert store.cache.hits == hits + 2  # both files of the last one came from the cache


def test_a_damaged_cached_copy_is_refetched_never_served(s3_spec):
    with servers.open_store(s3_spec) as store:
        rec = store.put("cc", *upload("ether", seed=3))
        want = store.load("cc").state_dict()
        path = store.file_path("cc", WEIGHTS_NAME)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01  # still a valid safetensors file: only the sha256 notices
        path.write_bytes(bytes(data))
        got = store.load("cc").state_dict()
        assert store.cache.refetches == 1
        assert all(got[k].equal(want[k]) for k in want)
        assert hashlib.sha256(store.file_path("cc", WEIGHTS_NAME).read_bytes()).hexdigest() == rec.sha256
        assert store.get("cc").status == "ready"


def test_a_damaged_remote_blob_is_refused(s3_spec):
    with servers.open_store(s3_spec) as store:
        store.put("bad", *upload("dct", seed=4))
        store.put("good", *upload("hut", seed=5))
        key = blob_key("bad", 1, WEIGHTS_NAME)
        data = bytearray(store.blobs.get(key, 1 << 20))
        data[-3] ^= 0x01
        # Damage behind the store's back: overwrite the object with a raw, unconditional put.
        store.blobs._s3.put_object(Bucket=store.blobs.bucket, Key="store/" + key, Body=bytes(data))
        with pytest.raises(Corrupt) as e:
            store.load("bad")
        assert e.value.where == WEIGHTS_NAME and "sha256" in e.value.message
        assert store.get("bad").status == "quarantined"
        assert key not in store.cache
        assert store.load("good").family == "hut"


# ---- crashes between blob and index, with kill -9 ------------------------------------------------
def put_in_a_process_killed_at(spec: dict, stage: str, adapter_id: str, family: str, seed: int) -> None:
    script = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        os.environ.update({servers.S3_ENV!r})
        import adapters_store.store as m
        from tests.store.backend_servers import open_store
        from tests.store.helpers import upload
        m._fault_point = lambda stage: os._exit(9) if stage == {stage!r} else None
        store = open_store(json.loads({json.dumps(spec)!r}))
        store.put({adapter_id!r}, *upload({family!r}, seed={seed}))
        sys.exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=180)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("stage", ["staged", "allocated", "renamed", "committed"])
def test_kill_9_between_blob_and_index(spec, open_store, stage):
    old = open_store().put("victim", *upload("lora", seed=1))
    put_in_a_process_killed_at(spec, stage, "victim", "dct", 2)
    put_in_a_process_killed_at(spec, stage, "fresh", "hut", 3)
    if stage in ("renamed", "committed"):  # the blobs were published before the kill
        with servers.open_store(spec, orphan_grace_s=3600) as peek:
            assert blob_key("fresh", 1, WEIGHTS_NAME) in blob_keys(peek)

    again = open_store(orphan_grace_s=0)  # the replica that restarts collects at once
    if stage == "committed":
        assert (again.get("victim").version, again.get("victim").family) == (2, "dct")
        assert again.get("fresh").family == "hut"
    else:
        assert again.get("victim") == old
        assert again.current_version("fresh") is None
        skipped = 0 if stage == "staged" else 1  # the killed put had reserved its number
        assert again.put("victim", *upload("surm", seed=4)).version == old.version + 1 + skipped
    assert_whole(again)


def test_rows_never_point_at_missing_blobs_at_open(open_store):
    """A row whose blobs were removed behind its back is quarantined at open, not served."""
    store = open_store()
    store.put("lost", *upload())
    store.put("kept", *upload("surm"))
    store.blobs.delete(blob_key("lost", 1, WEIGHTS_NAME))
    again = open_store()
    assert again.open_report.quarantined == ["lost"]
    with pytest.raises(Corrupt):
        again.load("lost")
    assert again.load("kept").family == "surm"


def test_two_replicas_share_one_store(tmp_path, s3_endpoint, pg_server):
    """Replicas share a store through S3 and PostgreSQL (local backends have one owner)."""
    spec = {
        "blob": "s3",
        "index": "postgres",
        "endpoint": s3_endpoint,
        "bucket": servers.new_bucket(s3_endpoint),
    }
    spec["dsn"] = servers.new_database(pg_server)
    a = servers.open_store({**spec, "root": str(tmp_path / "a")})
    b = servers.open_store({**spec, "root": str(tmp_path / "b")})
    rec = a.put("shared", *upload("lora", seed=1))
    assert b.load("shared", rec.version).family == "lora"
    rec2 = b.put("shared", *upload("hut", seed=2))
    assert rec2.version == 2 and a.load("shared").family == "hut"
    with pytest.raises(NotFound):
        a.load("shared", 1)
    a.delete("shared")
    with pytest.raises(NotFound):
        b.load("shared")
    a.close()
    b.close()


def test_commit_refuses_an_older_version(open_store):
    store = open_store()
    store.put("race", *upload())
    store.put("race", *upload("hut"))
    row = store.index.get("race")
    stale = Row(replace(row.record, version=1), row.config_sha256, row.base_model)
    assert store.index.commit(stale) == -1
    assert store.index.get("race") == row


# ---- settings --------------------------------------------------------------------------------------
def test_the_embedded_default_imports_neither_boto3_nor_psycopg(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from types import SimpleNamespace
        from server.app import open_store
        from server.settings import Settings
        from tests.store.helpers import BASE, MODULE_SHAPES
        import torch
        base = SimpleNamespace(module_shapes=MODULE_SHAPES, name=BASE, dtype=torch.float32)
        store = open_store(Settings(data_dir={str(tmp_path)!r}), base)
        assert type(store.blobs).__name__ == "LocalBlobStore" and type(store.index).__name__ == "SqliteIndex"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "psycopg"))
        assert not leaked, leaked
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_settings_select_the_backends(tmp_path, s3_endpoint, pg_server):
    from types import SimpleNamespace

    import torch

    from adapters_store.blobs_s3 import S3BlobStore
    from adapters_store.index_pg import PostgresIndex
    from server.app import open_store
    from server.settings import Settings

    from .helpers import BASE, MODULE_SHAPES

    bucket = servers.new_bucket(s3_endpoint)
    settings = Settings(
        data_dir=tmp_path,
        store_blob_url=f"s3://{bucket}/facet",
        store_s3_endpoint=s3_endpoint,
        store_index_url=servers.new_database(pg_server),
        store_cache_bytes=1 << 20,
    )
    base = SimpleNamespace(module_shapes=MODULE_SHAPES, name=BASE, dtype=torch.float32)
    with open_store(settings, base) as store:
        assert isinstance(store.blobs, S3BlobStore) and isinstance(store.index, PostgresIndex)
        assert (store.blobs.prefix, store.cache.max_bytes, store.orphan_grace_s) == ("facet/", 1 << 20, 900)
        store.put("via-settings", *upload("hut"))
        keys = {o["Key"] for o in store.blobs._s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert keys == {
            f"facet/{blob_key('via-settings', 1, n)}" for n in ("adapter_config.json", WEIGHTS_NAME)
        }
    for bad in ({"store_blob_url": "ftp://x"}, {"store_index_url": "mysql://x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**bad)


# ---- a backend that does not answer --------------------------------------------------------------
def test_s3_down_is_503_and_never_quarantines(tmp_path, s3_endpoint):
    from adapters_store import Unavailable

    spec = {"root": str(tmp_path / "store"), "blob": "s3", "index": "sqlite"}
    with servers.moto_server() as endpoint:  # a server of its own, to stop it mid-test
        spec |= {"endpoint": endpoint, "bucket": servers.new_bucket(endpoint)}
        store = servers.open_store(spec)
        store.put("far", *upload("lora", seed=1))
    for attempt in (lambda: store.load("far"), lambda: store.put("far", *upload("hut"))):
        with pytest.raises(Unavailable) as e:
            attempt()
        assert (e.value.status, e.value.where) == (503, "storage") and endpoint not in e.value.message
    assert store.get("far").status == "ready" and store.current_version("far") == 1
    store.close()


def test_postgres_down_is_503(tmp_path):
    from adapters_store import Unavailable
    from adapters_store.index_pg import PostgresIndex

    dsn = f"postgresql://facet@127.0.0.1:{servers.free_port()}/postgres"  # nothing listens there
    with pytest.raises(Unavailable) as e:
        servers.open_store({"root": str(tmp_path / "s"), "blob": "local", "index": "postgres", "dsn": dsn})
    assert e.value.status == 503 and e.value.where == "index"
    assert isinstance(PostgresIndex(dsn), PostgresIndex)  # constructing it connects to nothing
