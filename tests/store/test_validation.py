"""Every rejected upload: right error class and HTTP status, ``.where`` naming the tensor/field/limit,
nothing written to the store, listing unchanged (docs/checklist.md B, #12-23)."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from adapters_store import AdapterStore, StoreLimits, TooLarge, ValidationError

from .helpers import (
    BASE,
    LORA_A,
    MODULE_SHAPES,
    assemble,
    config_bytes,
    split,
    state_dict,
    tree,
    upload,
    weights_bytes,
)


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Nothing on the upload path may ever unpickle."""

    def boom(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """One store shared by the module: a rejected upload must leave it untouched anyway."""
    store = AdapterStore(tmp_path_factory.mktemp("shared") / "store", MODULE_SHAPES, BASE)
    store.put("existing", *upload("hut"))
    return store


def assert_rejected(store: AdapterStore, cfg: bytes, weights, cls=ValidationError, where=None, match=None):
    before_tree, before_list = tree(store.root), store.list(0, 1000)
    with pytest.raises(cls) as info:
        store.put("new-adapter", cfg, weights)
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert err.status == (413 if cls is TooLarge else 422)
    if where is not None:
        assert err.where == where, str(err)
    if match is not None:
        assert match in err.message, err.message
    assert str(store.root) not in err.message and str(store.root) not in str(err)
    assert tree(store.root) == before_tree
    assert store.list(0, 1000) == before_list
    return err


# ---- not safetensors at all ----------------------------------------------------------------------


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create the canary file
        return (open, (str(self.path), "w"))


def test_pickle_disguised_as_safetensors(populated, tmp_path):
    canary = tmp_path / "canary"
    raw = pickle.dumps({"x": _Canary(canary)}, protocol=4)
    err = assert_rejected(populated, config_bytes(), raw, where="weights", match="not a safetensors file")
    assert "pickle" in err.message
    assert not canary.exists()


def test_torch_zip_checkpoint_disguised_as_safetensors(populated, tmp_path, monkeypatch):
    monkeypatch.undo()  # torch.save needs the real pickle module
    path = tmp_path / "adapter_model.safetensors"
    torch.save(state_dict(), path)
    assert path.read_bytes()[:2] == b"PK"
    err = assert_rejected(populated, config_bytes(), path, where="weights", match="not a safetensors file")
    assert "zip" in err.message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x07\x00",
        struct.pack("<Q", 2**64 - 1) + b"{}",
        struct.pack("<Q", 100) + b"{}",
        struct.pack("<Q", 0) + b"{}",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b"\xff\xfe{}",
        struct.pack("<Q", 9) + b'{"a": NaN}',
        struct.pack("<Q", 3) + b"{}}",
        struct.pack("<Q", 8) + b"[" * 8,
    ],
    ids=[
        "empty",
        "short",
        "n-2^64",
        "n-past-eof",
        "n-zero",
        "not-object",
        "not-utf8",
        "nan",
        "bad-json",
        "deep",
    ],
)
def test_header_length_and_framing(populated, data):
    assert_rejected(populated, config_bytes(), data, where="weights", match="not a safetensors file")


def test_header_over_cap_is_too_large_before_reading_it(populated, tmp_path):
    header, data = split(weights_bytes())
    raw = json.dumps(header).encode() + b" " * (1 << 20)  # valid JSON, padded past the 1 MiB cap
    path = tmp_path / "big.safetensors"
    path.write_bytes(assemble(raw, data))
    assert_rejected(populated, config_bytes(), path, TooLarge, where="max_header_bytes")
    assert_rejected(populated, config_bytes(), path.read_bytes(), TooLarge, where="max_header_bytes")


def test_limits(root, tmp_path):
    store = AdapterStore(root, MODULE_SHAPES, BASE, StoreLimits(max_weights_bytes=4000, max_config_bytes=200))
    cfg, weights = upload("lora")  # 4.5 kB
    assert_rejected(store, cfg, weights, TooLarge, where="max_weights_bytes")
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights)
    assert_rejected(store, cfg, path, TooLarge, where="max_weights_bytes")
    assert_rejected(store, cfg + b" " * 200, upload("surm")[1], TooLarge, where="max_config_bytes")

    few = AdapterStore(tmp_path / "few", MODULE_SHAPES, BASE, StoreLimits(max_tensors=4))
    assert_rejected(few, cfg, weights, TooLarge, where="max_tensors")


# ---- header contents -----------------------------------------------------------------------------


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header,data_len,where,match",
    [
        ({"a": entry(), "b": entry(offsets=(4, 12))}, 12, "b", "overlap"),
        ({"a": entry(), "b": entry(offsets=(12, 20))}, 20, "b", "gap"),
        ({"a": entry(offsets=(4, 12))}, 12, "a", "gap"),
        ({"a": entry()}, 12, "weights", "trailing"),
        ({"a": entry(), "b": entry(offsets=(8, 16))}, 12, "b", "past the end"),
        ({"a": entry(offsets=(8, 0))}, 8, "a", "begin"),
        ({"a": entry(offsets=(0, -8))}, 8, "a", "data_offsets"),
        ({"a": entry(offsets=(0,))}, 8, "a", "data_offsets"),
        ({"a": entry(shape=(3,))}, 8, "a", "needs 12"),
        ({"a": entry(shape=(2**62, 2**62))}, 8, "a", "shape"),
        ({"a": entry(shape=(-2,))}, 8, "a", "shape"),
        ({"a": entry(shape=(2.0,))}, 8, "a", "shape"),
        ({"a": entry(shape=[1] * 9, offsets=(0, 4))}, 4, "a", "rank"),
        ({"a": entry(dtype="F64", offsets=(0, 16))}, 16, "a", "dtype"),
        ({"a": entry(dtype="BOOL", offsets=(0, 2))}, 2, "a", "dtype"),
        ({"a": entry(dtype="F8_E4M3", offsets=(0, 2))}, 2, "a", "dtype"),
        ({"a": entry(dtype="U8", offsets=(0, 2))}, 2, "a", "dtype"),
        ({"a": entry(dtype="complex")}, 8, "a", "dtype"),
        ({"a": {**entry(), "extra": 1}}, 8, "a", "unknown keys"),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "a", "missing keys"),
        ({"a": [1, 2]}, 8, "a", "object"),
        ({"__metadata__": {"k": 1}, "a": entry()}, 8, "__metadata__", "string"),
    ],
    ids=lambda v: None,
)
def test_header_entries(populated, header, data_len, where, match):
    assert_rejected(populated, config_bytes(), assemble(header, b"\0" * data_len), where=where, match=match)


def test_metadata_over_cap(populated):
    header, data = split(weights_bytes())
    header["__metadata__"] = {"k": "x" * (17 << 10)}
    assert_rejected(populated, config_bytes(), assemble(header, data), TooLarge, where="max_metadata_bytes")


def test_duplicate_tensor_key_in_header(populated):
    header, data = split(weights_bytes())
    text = json.dumps(header)
    # The same tensor twice, aliasing the same bytes: the Rust reader would silently keep one.
    dup = text[:-1] + f", {json.dumps(LORA_A)}: {json.dumps(header[LORA_A])}}}"
    err = assert_rejected(populated, config_bytes(), assemble(dup, data), where=LORA_A, match="duplicate")
    assert err.status == 422


def test_duplicate_key_in_config(populated):
    raw = b'{"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "r": 64}'
    assert_rejected(populated, raw, weights_bytes(), where="r", match="duplicate")


# ---- semantic checks and values ------------------------------------------------------------------


def _with(sd: dict, key: str, value: float, dtype=torch.float32) -> bytes:
    t = sd[key].clone().to(dtype)
    t.view(-1)[5] = value
    return save({**sd, key: t})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values(populated, value):
    data = _with(state_dict(), LORA_A, value)
    assert_rejected(populated, config_bytes(), data, where=LORA_A, match="NaN or Inf")


@pytest.mark.parametrize("value,dtype", [(1e30, torch.float32), (-2e4, torch.float32), (3e4, torch.bfloat16)])
def test_huge_values(populated, value, dtype):
    sd = {k: v.to(dtype) for k, v in state_dict().items()}
    data = _with(sd, LORA_A, value, dtype)
    assert_rejected(populated, config_bytes(), data, where=LORA_A, match="max_abs_value")


def test_unknown_tensor_name(populated):
    extra = LORA_A.replace("lora_A", "lora_C")
    data = save({**state_dict(), extra: torch.zeros(2)})
    assert_rejected(populated, config_bytes(), data, where=extra, match="unexpected tensor")


def test_tensor_name_outside_targets(populated):
    stray = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    data = save({**state_dict(), stray: torch.zeros(4, 24)})
    assert_rejected(populated, config_bytes(), data, where=stray)


def test_wrong_shape(populated):
    data = save({**state_dict(), LORA_A: torch.zeros(5, 24)})
    assert_rejected(populated, config_bytes(), data, where=LORA_A, match="shape")


def test_missing_tensor(populated):
    sd = state_dict()
    del sd[LORA_A]
    assert_rejected(populated, config_bytes(), save(sd), where=LORA_A, match="missing")


def test_integer_tensor_where_a_float_is_expected(populated):
    data = save({**state_dict(), LORA_A: torch.zeros(4, 24, dtype=torch.int32)})
    assert_rejected(populated, config_bytes(), data, where=LORA_A, match="dtype")


def test_dct_positions_out_of_range(populated):
    sd = state_dict("dct")
    key = next(k for k in sd if k.endswith("q_proj.dct_rows"))
    rows = sd[key].clone()
    rows[0] = 10**6
    assert_rejected(populated, config_bytes("dct"), save({**sd, key: rows}), where=key)


def test_empty_file_of_tensors(populated):
    assert_rejected(populated, config_bytes(), save({}), match="missing")


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,where",
    [
        (config_bytes("hut", auto_mapping={"base_model_class": "X", "parent_library": "os"}), "auto_mapping"),
        (config_bytes("lora", auto_mapping={"parent_library": "os", "evil": "x"}), "auto_mapping"),
        (config_bytes("lora", tokenizer_kwargs={"trust_remote_code": True}), "tokenizer_kwargs"),
        (config_bytes("hut", megatron_core="evil.module"), "megatron_core"),
        (config_bytes("lora", use_dora="yes"), "use_dora"),  # true is DoRA, served
        (config_bytes("lora", peft_type="EVIL"), "peft_type"),
        (config_bytes("lora", peft_type=None), "peft_type"),
        (config_bytes("lora", r=0), "r"),
        (config_bytes("lora", target_modules=["nothing_here"]), "target_modules"),
        (config_bytes("hut", r=100), "r"),
        (b"[1, 2]", "config"),
        (b"{not json", "config"),
        (b'{"peft_type": "LORA", "lora_alpha": NaN}', "config"),
        (b'{"peft_type": "LORA", "lora_alpha": 1e400}', "config"),
        (b"\xff\xfe{}", "config"),
        (b"[" * 50000, "config"),
    ],
    ids=lambda v: None,
)
def test_bad_configs(populated, cfg, where):
    assert_rejected(populated, cfg, weights_bytes(), where=where)


# ---- ids -----------------------------------------------------------------------------------------

BAD_IDS = [
    "../x",
    "a/b",
    "/abs",
    "a\\b",
    "http://x",
    "http://169.254.169.254/",
    "a\x00b",
    "a" * 200,
    "",
    ".hidden",
    "-x",
    "a..b",
    "x..",
    "%2e%2e%2f",
    "caf\u00e9",
    "\uff41bc",  # full-width look-alike
    "x\n",
    " x",
    "x@",
    "x@1234567890",
    "x@1@2",
    "@1",
]


@pytest.mark.parametrize("bad_id", BAD_IDS + [None, 7], ids=repr)
def test_bad_ids(populated, bad_id):
    before = tree(populated.root)
    for call in (
        lambda: populated.put(bad_id, *upload()),
        lambda: populated.get(bad_id),
        lambda: populated.load(bad_id),
        lambda: populated.delete(bad_id),
        lambda: populated.current_version(bad_id),
        lambda: populated.file_path(bad_id, "adapter_config.json"),
    ):
        with pytest.raises(ValidationError) as e:
            call()
        assert e.value.where == "adapter_id" and e.value.status == 422
    assert tree(populated.root) == before


def test_good_ids(store):
    for aid in ("a", "A.b_c-d", "x" * 128, "0", "job@1", "job-x.y@123456789"):
        assert store.put(aid, *upload()).adapter_id == aid


def test_long_client_strings_are_clipped_in_errors(populated):
    name = "n" * 100_000
    err = assert_rejected(populated, config_bytes(), assemble({name: entry(dtype="F64")}, b"\0" * 8))
    assert err.where.startswith("nnn") and len(err.where) <= 256
    err = assert_rejected(
        populated, config_bytes("lora", peft_type="P" * 60_000), weights_bytes(), where="peft_type"
    )
    assert len(err.message) <= 1024
