"""put / get / load / list / delete, versions, file layout."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from adapters_store import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterRecord,
    AdapterStore,
    Conflict,
    NotFound,
    ValidationError,
)
from server.methods import parse_config

from .helpers import (
    BASE,
    FAMILIES,
    MODULE_SHAPES,
    config_bytes,
    make_adapter,
    raw_config,
    upload,
    weights_bytes,
)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_family(store, family):
    cfg, weights = upload(family)
    rec = store.put(f"ad-{family}", cfg, weights)
    assert isinstance(rec, AdapterRecord)
    assert (rec.adapter_id, rec.version, rec.family, rec.status, rec.error) == (
        f"ad-{family}",
        1,
        family,
        "ready",
        None,
    )
    assert rec.sha256 == hashlib.sha256(weights).hexdigest()
    assert rec.nbytes == len(weights)
    expected = make_adapter(family)
    assert rec.trainable_params == expected.trainable_count() > 0
    assert rec.config == parse_config(raw_config(family))[1].model_dump(mode="json")
    assert store.get(f"ad-{family}") == rec

    loaded = store.load(f"ad-{family}", 1)
    assert loaded.family == family
    assert loaded.config == expected.config
    assert loaded.shapes == expected.shapes
    assert_same_tensors(loaded.state_dict(), expected.state_dict())
    # The stored weights are the uploaded bytes; the config is the canonical JSON of the parsed config.
    assert store.file_path(f"ad-{family}", WEIGHTS_NAME).read_bytes() == weights
    assert json.loads(store.file_path(f"ad-{family}", CONFIG_NAME).read_bytes()) == rec.config


def test_round_trip_from_a_path_and_across_restart(store, reopen, tmp_path):
    cfg, weights = upload("hut", seed=3)
    src = tmp_path / "upload.safetensors"
    src.write_bytes(weights)
    rec = store.put("from-path", cfg, src)
    assert rec.sha256 == hashlib.sha256(weights).hexdigest()
    again = reopen()
    assert again.get("from-path") == rec
    assert again.open_report.orphans_removed == again.open_report.staging_removed == 0
    assert not again.open_report.degraded
    assert_same_tensors(again.load("from-path").state_dict(), make_adapter("hut", seed=3).state_dict())


def test_layout_on_disk(store, root):
    store.put("lay.out_1", *upload())
    folder = root / "adapters" / "lay.out_1" / "v1"
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (root / "index.sqlite3").is_file()
    assert list((root / "staging").iterdir()) == []
    assert store.file_path("lay.out_1", WEIGHTS_NAME) == folder / WEIGHTS_NAME
    with pytest.raises(ValidationError) as e:
        store.file_path("lay.out_1", "../index.sqlite3")
    assert e.value.where == "name"
    with pytest.raises(NotFound):
        store.file_path("absent", WEIGHTS_NAME)


def test_reupload_creates_next_version_and_removes_the_old_files(store, root):
    r1 = store.put("ver", *upload("lora", seed=1))
    r2 = store.put("ver", config_bytes("dct"), weights_bytes("dct", seed=2))
    assert (r1.version, r2.version) == (1, 2)
    assert store.current_version("ver") == 2
    assert store.get("ver").family == "dct"
    assert sorted(p.name for p in (root / "adapters" / "ver").iterdir()) == ["v2"]
    with pytest.raises(NotFound) as e:
        store.load("ver", 1)
    assert e.value.where == "version"
    assert store.load("ver", 2).family == "dct"
    assert store.load("ver").family == "dct"
    assert store.list(0, 10)[1] == 1


def test_checkpoint_ids(store):
    rec = store.put("job-7@1200", *upload())
    assert store.get("job-7@1200") == rec
    assert store.current_version("job-7") is None


def test_delete(store, root):
    store.put("gone", *upload())
    store.put("stays", *upload("surm"))
    rec = store.delete("gone")
    assert rec.adapter_id == "gone" and rec.version == 1
    assert not (root / "adapters" / "gone").exists()
    for call in (store.get, store.load, store.delete):
        with pytest.raises(NotFound) as e:
            call("gone")
        assert e.value.status == 404
    assert store.current_version("gone") is None
    assert [r.adapter_id for r in store.list()[0]] == ["stays"]
    # Versions are never reused: an upload after a delete gets a new number.
    assert store.put("gone", *upload()).version == 2


def test_not_found_is_identical_for_every_missing_id(store):
    bodies = []
    for aid in ("nope", "other-missing"):
        with pytest.raises(NotFound) as e:
            store.get(aid)
        bodies.append(e.value.to_dict())
    assert (
        bodies[0]
        == bodies[1]
        == {"error": "not_found", "where": "adapter_id", "message": "no adapter with this id"}
    )


def test_list_pagination_and_total_bytes(store):
    ids = [f"p{i:02d}" for i in range(7)]
    sizes = 0
    for i, aid in enumerate(reversed(ids)):
        sizes += store.put(aid, *upload(FAMILIES[i % 5], seed=i)).nbytes
    page1, total = store.list(0, 3)
    page2, _ = store.list(3, 3)
    page3, _ = store.list(6, 3)
    assert total == 7
    assert [r.adapter_id for r in page1 + page2 + page3] == ids
    assert store.list(7, 3) == ([], 7)
    assert store.total_bytes() == sizes
    for offset, limit, where in (
        (-1, 3, "offset"),
        (0, 0, "limit"),
        (0, 10**6, "limit"),
        (True, 3, "offset"),
    ):
        with pytest.raises(ValidationError) as e:
            store.list(offset, limit)
        assert e.value.where == where


def test_other_base_model_is_a_conflict(store, reopen):
    store.put("based", *upload())
    other = reopen(base="another-model")
    with pytest.raises(Conflict) as e:
        other.load("based")
    assert e.value.status == 409 and e.value.where == "base_model"
    assert other.get("based").status == "ready"  # not quarantined: the files are fine


def test_empty_store(root):
    store = AdapterStore(root, MODULE_SHAPES, BASE)
    assert store.list() == ([], 0)
    assert store.total_bytes() == 0
