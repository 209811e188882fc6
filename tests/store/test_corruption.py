"""Damage on disk after a successful upload: the next load fails with Corrupt (409, "re-upload"),
the adapter is quarantined, other adapters keep loading (docs/checklist.md #28)."""

from __future__ import annotations

import json
import os

import pytest

from adapters_store import CONFIG_NAME, WEIGHTS_NAME, Corrupt

from .helpers import FAMILIES, assert_consistent, split, upload


@pytest.fixture
def filled(store):
    for i, family in enumerate(FAMILIES):
        store.put(f"ok-{family}", *upload(family, seed=i))
    store.put("victim", *upload("lora", seed=9))
    return store


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def damage_data_byte(store):
    path = store.file_path("victim", WEIGHTS_NAME)
    flip(path, path.stat().st_size - 3)  # inside the data section: still a valid file


def damage_header_byte(store):
    path = store.file_path("victim", WEIGHTS_NAME)
    flip(path, 20)


def truncate(store):
    path = store.file_path("victim", WEIGHTS_NAME)
    path.write_bytes(path.read_bytes()[:-100])


def remove_weights(store):
    store.file_path("victim", WEIGHTS_NAME).unlink()


def symlink_weights(store):
    path = store.file_path("victim", WEIGHTS_NAME)
    copy = path.with_name("elsewhere")
    os.replace(path, copy)
    os.symlink(copy, path)


def tamper_config(store):
    path = store.file_path("victim", CONFIG_NAME)
    cfg = json.loads(path.read_bytes())
    cfg["lora_alpha"] = 64.0  # still a valid config: only the hash notices
    path.write_text(json.dumps(cfg))


def nan_same_size(store):
    """Rewrite a value as NaN: only the hash notices before the values would be used."""
    path = store.file_path("victim", WEIGHTS_NAME)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,where,reason",
    [
        (damage_data_byte, WEIGHTS_NAME, "sha256"),
        (damage_header_byte, WEIGHTS_NAME, "sha256"),
        (truncate, WEIGHTS_NAME, "wrong size"),
        (remove_weights, WEIGHTS_NAME, "missing"),
        (symlink_weights, WEIGHTS_NAME, "unreadable"),
        (tamper_config, CONFIG_NAME, "sha256"),
        (nan_same_size, WEIGHTS_NAME, "sha256"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_damage_quarantines_only_that_adapter(filled, reopen, damage, where, reason):
    damage(filled)
    with pytest.raises(Corrupt) as e:
        filled.load("victim", 1)
    err = e.value
    assert (err.status, err.where) == (409, where)
    assert reason in err.message and "re-upload" in err.message
    assert str(filled.root) not in err.message
    rec = filled.get("victim")
    assert rec.status == "quarantined" and reason in rec.error

    # Every later load fails the same way, also after a restart, without touching the files again.
    for store in (filled, reopen()):
        with pytest.raises(Corrupt) as again:
            store.load("victim")
        assert again.value.where == "adapter_id" and "quarantined" in again.value.message
        assert store.current_version("victim") == 1
        for family in FAMILIES:
            assert store.load(f"ok-{family}").family == family
        assert store.list()[1] == len(FAMILIES) + 1

    # A re-upload heals it.
    rec2 = filled.put("victim", *upload("lora", seed=10))
    assert (rec2.version, rec2.status, rec2.error) == (2, "ready", None)
    assert filled.load("victim", 2).family == "lora"
    assert_consistent(filled)


def test_quarantined_adapter_can_be_deleted(filled):
    truncate(filled)
    with pytest.raises(Corrupt):
        filled.load("victim")
    assert filled.delete("victim").status == "quarantined"
    assert_consistent(filled)


def test_file_that_no_longer_validates_is_quarantined(filled, reopen):
    """Same bytes, stricter server: limits tightened since the upload."""
    from adapters_store import AdapterStore, StoreLimits

    from .helpers import BASE, MODULE_SHAPES

    strict = AdapterStore(filled.root, MODULE_SHAPES, BASE, StoreLimits(max_abs_value=1e-6))
    with pytest.raises(Corrupt) as e:
        strict.load("victim")
    assert "no longer validate" in e.value.message
    assert e.value.where.endswith(".weight")


def test_replacement_during_load_is_not_mistaken_for_corruption(filled, monkeypatch):
    """A re-upload that removes the old files while a load reads them: the load retries."""
    real_read = type(filled)._read
    calls = []

    def racing_read(self, folder, name, max_bytes):
        if not calls:
            calls.append(name)
            monkeypatch.setattr(type(filled), "_read", real_read)
            self.put("victim", *upload("hut", seed=5))  # removes v1 under our feet
        return real_read(self, folder, name, max_bytes)

    monkeypatch.setattr(type(filled), "_read", racing_read)
    adapter = filled.load("victim")
    assert adapter.family == "hut"
    assert filled.get("victim").status == "ready"
    assert_consistent(filled)


def test_header_metadata_survives(filled):
    header, _ = split(filled.file_path("ok-lora", WEIGHTS_NAME).read_bytes())
    assert header["__metadata__"] == {"format": "pt"}
