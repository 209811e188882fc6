"""The adapter service: the one owner of put / delete / pin / unpin / describe.

Run on the tiny model's real store and engine (the engine thread is not started: nothing here
needs a forward pass). ``engine.forget`` is wrapped to record every call.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from adapters_store.errors import NotFound
from server.adapters_service import AdapterService
from tests.api.conftest import adapter_files
from tests.api.tiny_server import build_tiny, tiny_settings

RACERS = 4


@pytest.fixture
def setup(tmp_path, monkeypatch):
    settings = tiny_settings(data_dir=tmp_path / "data")
    engine, store = build_tiny(settings)
    forgotten: list[tuple[str, int]] = []
    real_forget = engine.forget

    def forget(adapter_id: str, version: int) -> None:
        forgotten.append((adapter_id, version))
        real_forget(adapter_id, version)

    monkeypatch.setattr(engine, "forget", forget)
    files = [adapter_files(engine.base, "lora", tmp_path / f"a{i}", seed=i) for i in range(RACERS + 1)]
    yield AdapterService(store, engine), engine, files, forgotten
    store.close()


def test_a_put_makes_the_engine_forget_the_version_it_replaced(setup):
    service, engine, files, forgotten = setup
    first = service.put("a", *files[0])
    assert first.version == 1 and forgotten == []  # a new id replaces nothing
    engine.residency.get_host(("a", 1))  # v1 is loaded
    assert service.get("a").tiers == ("host",)
    second = service.put("a", *files[1])
    assert second.version == 2 and forgotten == [("a", 1)]
    assert engine.residency.snapshot(("a", 1)).tiers == ()  # no request used it: dropped at once


def test_racing_puts_forget_each_replaced_version_exactly_once(setup):
    service, _, files, forgotten = setup
    service.put("a", *files[0])
    barrier = threading.Barrier(RACERS)
    records, errors = [], []

    def put(i: int) -> None:
        barrier.wait()
        try:
            records.append(service.put("a", *files[1 + i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    current = service.store.current_version("a")
    versions = {1} | {r.version for r in records}
    assert len(versions) == RACERS + 1 and current == max(versions)
    # Every superseded version forgotten once; the current one never.
    assert Counter(forgotten) == Counter(("a", v) for v in versions - {current})


def test_delete_forgets_the_version_and_drops_the_pin(setup):
    service, engine, files, forgotten = setup
    record = service.put("a", *files[0])
    service.pin("a")
    engine.residency.get_host(("a", record.version))
    view = service.delete("a")
    assert forgotten == [("a", record.version)]
    assert view.on_disk is False and view.pinned is False and view.tiers == ()
    assert view.to_json()["residency"] == [] and not engine.residency.pinned_ids
    with pytest.raises(NotFound):
        service.delete("a")
    assert forgotten == [("a", record.version)]  # a failed delete forgets nothing


def test_describe_reports_tiers_and_pin_of_one_snapshot(setup):
    service, engine, files, _ = setup
    record = service.put("a", *files[0])
    assert service.get("a").to_json()["residency"] == ["disk"]
    engine.residency.get_host(("a", record.version))
    pinned = service.pin("a")
    assert pinned.pinned is True and pinned.to_json()["residency"] == ["disk", "host"]
    assert pinned.to_json()["version"] == record.version and pinned.record == record
    assert service.unpin("a").pinned is False
    with pytest.raises(NotFound):
        service.pin("missing")
    assert "missing" not in engine.residency.pinned_ids


def test_the_snapshot_is_taken_under_the_residency_lock(setup):
    """While another thread holds the residency's host lock (a load, an eviction, a forget or a
    pin in progress), a describe waits for it instead of reading half of its change."""
    service, engine, files, _ = setup
    record = service.put("a", *files[0])
    done = threading.Event()
    with engine.residency._host_lock:
        reader = threading.Thread(target=lambda: (service.describe(record), done.set()))
        reader.start()
        assert not done.wait(0.1)
    reader.join()
    assert done.is_set()
