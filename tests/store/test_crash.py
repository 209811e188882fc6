"""Crash safety: a crash at any point of put/delete leaves each adapter whole or absent after a
restart; the open sweeps leftovers, quarantines rows with missing files, rebuilds a damaged index
(docs/checklist.md C, #26, #27, #30)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adapters_store.store as store_mod
from adapters_store import WEIGHTS_NAME, Corrupt

from .helpers import assert_consistent, upload, weights_bytes


class SimulatedCrash(BaseException):
    pass


def crash_at(monkeypatch, stage: str) -> None:
    """Make put die at ``stage`` like a kill -9: no cleanup of any kind runs."""

    def fault(s: str) -> None:
        if s == stage:
            raise SimulatedCrash(s)

    monkeypatch.setattr(store_mod, "_fault_point", fault)
    monkeypatch.setattr(store_mod, "_discard_uncommitted", lambda path: None)


def half_written(path: Path, data: bytes) -> None:
    path.write_bytes(data[: len(data) // 2])
    raise SimulatedCrash("mid-write")


@pytest.mark.parametrize("stage", ["mid-write", "staged", "allocated", "renamed"])
def test_crash_before_commit_leaves_the_old_version(store, reopen, monkeypatch, stage):
    keep = store.put("keep", *upload("surm"))
    old = store.put("victim", *upload("lora", seed=1))
    if stage == "mid-write":
        monkeypatch.setattr(store_mod, "_discard_uncommitted", lambda path: None)
        monkeypatch.setattr(store_mod, "write_durable", half_written)
    else:
        crash_at(monkeypatch, stage)
    for aid in ("victim", "fresh"):
        with pytest.raises(SimulatedCrash):
            store.put(aid, *upload("lora", seed=2))
    # Even before the restart the index never shows the partial uploads.
    assert [r.adapter_id for r in store.list()[0]] == ["keep", "victim"]
    monkeypatch.undo()

    again = reopen()
    assert again.list()[0] == [keep, old]
    assert again.open_report.staging_removed + again.open_report.orphans_removed >= 2
    assert not (again.root / "adapters" / "fresh").exists()
    assert_consistent(again)
    assert again.put("victim", *upload("lora", seed=3)).version > old.version


def test_crash_after_commit_keeps_the_new_version(store, reopen, monkeypatch):
    store.put("victim", *upload("lora", seed=1))
    crash_at(monkeypatch, "committed")
    with pytest.raises(SimulatedCrash):
        store.put("victim", *upload("dct", seed=2))
    assert sorted(p.name for p in (store.root / "adapters" / "victim").iterdir()) == ["v1", "v2"]
    monkeypatch.undo()

    again = reopen()
    rec = again.get("victim")
    assert (rec.version, rec.family) == (2, "dct")
    assert again.open_report.orphans_removed == 1
    assert_consistent(again)


def test_crash_during_delete(store, reopen, monkeypatch):
    store.put("doomed", *upload())
    store.put("keep", *upload("hut"))

    def die(path):
        raise SimulatedCrash("delete")

    monkeypatch.setattr(store_mod, "_discard_uncommitted", die)
    with pytest.raises(SimulatedCrash):
        store.delete("doomed")
    monkeypatch.undo()
    again = reopen()
    assert [r.adapter_id for r in again.list()[0]] == ["keep"]
    assert_consistent(again)


def test_kill_9_after_rename_in_a_real_process(store, reopen):
    store.put("victim", *upload("lora", seed=1))
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        import adapters_store.store as m
        from adapters_store import AdapterStore
        from tests.store.helpers import BASE, MODULE_SHAPES, upload
        m._fault_point = lambda stage: os._exit(9) if stage == "renamed" else None
        AdapterStore({str(store.root)!r}, MODULE_SHAPES, BASE).put("victim", *upload("lora", seed=2))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (store.root / "adapters" / "victim").iterdir()) == ["v1", "v2"]
    again = reopen()
    assert again.get("victim").version == 1
    assert_consistent(again)


def test_open_sweeps_strays_without_following_links(store, reopen, tmp_path):
    store.put("real", *upload())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    adapters = store.root / "adapters"
    (adapters / "ghost" / "v1").mkdir(parents=True)
    (adapters / "ghost" / "v1" / WEIGHTS_NAME).write_bytes(weights_bytes())
    (adapters / "real" / "v7").mkdir()
    (adapters / "real" / "junk.txt").write_text("x")
    (adapters / "stray.txt").write_text("x")
    (adapters / "bad..name").mkdir()
    os.symlink(outside, adapters / "link")
    os.symlink(outside, adapters / "real" / "v9")
    (store.root / "staging" / "abc").mkdir()
    (store.root / "staging" / "abc" / WEIGHTS_NAME).write_bytes(b"partial")

    again = reopen()
    assert again.open_report.staging_removed == 1
    assert again.open_report.orphans_removed == 7
    assert (outside / "precious").read_text() == "keep me"
    assert_consistent(again)


def test_rows_with_missing_files_are_quarantined_at_open(store, reopen):
    store.put("broken", *upload())
    store.put("fine", *upload("ether"))
    store.file_path("broken", WEIGHTS_NAME).unlink()
    again = reopen()
    assert again.open_report.quarantined == ["broken"]
    assert again.open_report.degraded
    rec = again.get("broken")
    assert rec.status == "quarantined" and "missing" in rec.error
    with pytest.raises(Corrupt) as e:
        again.load("broken")
    assert e.value.status == 409 and "re-upload" in e.value.message
    assert again.load("fine").family == "ether"
    # A second restart keeps the reason; a re-upload heals it.
    assert reopen().get("broken").error == rec.error
    assert again.put("broken", *upload()).status == "ready"
    assert_consistent(again)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-header"])
def test_damaged_index_is_rebuilt_from_the_files(store, reopen, damage):
    a = store.put("alpha", *upload("lora", seed=1))
    b = store.put("beta", *upload("dct", seed=2))
    b = store.put("beta", *upload("dct", seed=3))
    store.put("gamma", *upload("hut"))
    store.file_path("gamma", WEIGHTS_NAME).write_bytes(b"not safetensors")
    store.close()  # the server stopped; the index is damaged while it is down
    db = store.root / "index.sqlite3"
    for side in ("index.sqlite3-wal", "index.sqlite3-shm"):
        (store.root / side).unlink(missing_ok=True)
    raw = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"\x00garbage" * 512)
    elif damage == "truncated":
        db.write_bytes(raw[: len(raw) // 2 + 7])
    else:
        db.write_bytes(b"SQLite format 3\x00" + b"\xff" * (len(raw) - 16))

    again = reopen()
    assert again.open_report.index_rebuilt and again.open_report.degraded
    assert any(p.name.startswith("index.sqlite3.corrupt-") for p in again.root.iterdir())
    for old in (a, b):
        rec = again.get(old.adapter_id)
        assert (rec.version, rec.sha256, rec.family, rec.config, rec.status) == (
            old.version,
            old.sha256,
            old.family,
            old.config,
            "ready",
        )
    assert again.get("gamma").status == "quarantined"
    with pytest.raises(Corrupt):
        again.load("gamma")
    assert again.put("beta", *upload("dct", seed=4)).version == 3  # counter recovered
    again.delete("gamma")
    assert_consistent(again)


def test_durable_write_order(store, monkeypatch):
    """file fsync (write_durable) -> rename -> directory fsync -> index commit (test 27)."""
    calls: list[str] = []
    real = {
        "write_durable": store_mod.write_durable,
        "fsync_dir": store_mod.fsync_dir,
        "rename": os.rename,
        "commit": store._index.commit,
    }

    def spy(name, label):
        def wrapper(*args):
            calls.append(label(*args))
            return real[name](*args)

        return wrapper

    monkeypatch.setattr(
        store_mod, "write_durable", spy("write_durable", lambda p, d: f"write+fsync {p.name}")
    )
    monkeypatch.setattr(store_mod, "fsync_dir", spy("fsync_dir", lambda p: f"fsync dir {p.name}"))
    monkeypatch.setattr(os, "rename", spy("rename", lambda a, b: f"rename -> {Path(b).name}"))
    monkeypatch.setattr(store._index, "commit", spy("commit", lambda row: "commit"))
    store.put("dur", *upload())
    staging = calls[2].removeprefix("fsync dir ")
    assert calls == [
        "write+fsync adapter_config.json",
        "write+fsync adapter_model.safetensors",
        f"fsync dir {staging}",
        "fsync dir adapters",  # a new id folder was created
        "rename -> v1",
        "fsync dir dur",
        "fsync dir staging",
        "commit",
    ]


def test_disk_full_leaves_nothing_behind(store, monkeypatch):
    import errno

    from adapters_store import StorageFull

    from .helpers import tree

    store.put("existing", *upload())
    before = tree(store.root)

    def full(path, data):
        path.write_bytes(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_mod, "write_durable", full)
    with pytest.raises(StorageFull) as e:
        store.put("new", *upload("hut"))
    assert e.value.status == 507 and str(store.root) not in str(e.value)
    assert tree(store.root) == before
    monkeypatch.undo()
    assert_consistent(store)
