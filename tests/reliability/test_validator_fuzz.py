"""Property-based fuzzing of the upload validator (``adapters_store.validate.validate_upload``).

Inputs: (a) arbitrary bytes as the weights file; (b) mutations of a valid adapter file of every
family - bit flips, truncation, trailing bytes, a wrong header length field, header JSON edits
(dtype, shape, offsets, extra/missing/renamed/aliased/duplicate keys, metadata, padding) and
single-value edits of the tensor data (NaN, Inf, huge, ordinary); (c) arbitrary adapter_config
JSON, hostile fields included.

Properties proved for every input:

1. the validator either returns or raises ``ValidationError`` (``TooLarge`` is one) - nothing
   else, whatever the bytes; its message is bounded text;
2. it never accepts an invalid file. Validity is decided by an independent oracle: the header
   has no duplicate keys, the reference ``safetensors`` reader loads the file, the tensors are
   exactly the ones the family expects with the expected shapes and dtypes, they tile the data
   section with no trailing bytes, every float is finite and within ``max_abs_value``, DCT
   positions are in range and distinct. Mutations that keep a file valid (data edits to ordinary
   values, swapped same-size ranges, header padding) may be accepted - and then the oracle
   agrees;
3. an accepted config names a known family, carries only that family's fields, re-validates to
   itself from its canonical bytes, and validating it imported no module it names.

Default: modest example counts (a few seconds); ``-m slow`` runs many more.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from adapters_store import StoreLimits, ValidationError
from adapters_store.validate import validate_config, validate_upload
from server.methods import method_for_peft_type
from server.methods.adapter import KEY_PREFIX
from tests.store.helpers import (
    FAMILIES,
    MODULE_SHAPES,
    assemble,
    config_bytes,
    raw_config,
    split,
    weights_bytes,
)

LIMITS = StoreLimits()
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INT_DTYPES = {torch.int32, torch.int64}


@cache
def valid(family: str) -> tuple[bytes, bytes, dict[str, tuple[tuple[int, ...], str]]]:
    """(config bytes, weights bytes, {tensor name: (shape, "float" | "int")}) of a valid adapter."""
    data = weights_bytes(family)
    specs = {
        name: (tuple(t.shape), "float" if t.is_floating_point() else "int")
        for name, t in st_load(data).items()
    }
    return config_bytes(family), data, specs


# ---------------------------------------------------------------------------------- the oracle


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate header key among {keys}"
    return dict(pairs)


def assert_truly_valid(family: str, data: bytes) -> None:
    """Independent judgement of an accepted weights file (raises AssertionError if invalid)."""
    _, _, specs = valid(family)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    meta = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()), meta
    try:
        tensors = st_load(data)
    except Exception as e:
        raise AssertionError(f"the safetensors reader rejects it: {e}") from None
    assert set(tensors) == set(header) == set(specs), sorted(set(tensors) ^ set(specs))
    ranges = sorted(tuple(header[name]["data_offsets"]) for name in header)
    pos = 0
    for begin, end in ranges:  # contiguous from 0 ...
        assert begin == pos, ranges
        pos = end
    assert 8 + n + pos == len(data), "trailing bytes after the last tensor"  # ... to the end
    for name, t in tensors.items():
        shape, kind = specs[name]
        assert tuple(t.shape) == shape, (name, t.shape, shape)
        if kind == "float":
            assert t.dtype in FLOAT_DTYPES, (name, t.dtype)
            assert bool(torch.isfinite(t).all()), f"{name}: NaN/Inf accepted"
            assert float(t.abs().max()) <= LIMITS.max_abs_value, f"{name}: huge value accepted"
        else:
            assert t.dtype in INT_DTYPES, (name, t.dtype)
    for name, t in tensors.items():  # DCT positions: in range, and (row, col) pairs distinct
        if name.endswith(".dct_rows"):
            path = name[len(KEY_PREFIX) : -len(".dct_rows")]
            out_f, in_f = MODULE_SHAPES[path]
            rows, cols = t.long(), tensors[name.replace("dct_rows", "dct_cols")].long()
            assert bool(((rows >= 0) & (rows < out_f)).all() and ((cols >= 0) & (cols < in_f)).all())
            assert len(set((rows * in_f + cols).tolist())) == rows.numel(), "duplicate DCT positions"


def check(config: bytes, weights: bytes | None, family: str | None):
    """Run the validator; only ValidationError may come out; an acceptance must be truly valid."""
    try:
        if weights is None:
            return validate_config(config, LIMITS)
        accepted = validate_upload(config, weights, MODULE_SHAPES, LIMITS)
    except ValidationError as e:
        assert isinstance(e.message, str) and 0 < len(e.message) <= 1024
        assert isinstance(e.where, str) and len(e.where) <= 256
        return None
    if weights is not None:
        assert accepted.weights == weights
        assert_truly_valid(family, weights)
    return accepted


# ------------------------------------------------------------------------------ (a) any bytes


@FAST
@given(family=st.sampled_from(FAMILIES), blob=st.binary(max_size=2048))
def test_arbitrary_bytes(family, blob):
    check(valid(family)[0], blob, family)


@FAST
@given(
    family=st.sampled_from(FAMILIES),
    header=st.binary(max_size=256) | st.text(max_size=256).map(str.encode),
    tail=st.binary(max_size=256),
)
def test_arbitrary_header_with_a_plausible_length(family, header, tail):
    check(valid(family)[0], struct.pack("<Q", len(header)) + header + tail, family)


# ------------------------------------------------------------------ (b) mutations of valid files

DTYPES = ["F32", "F16", "BF16", "I32", "I64", "F64", "U8", "BOOL", "F8_E4M3", "I8", "f32", "", None, 4]
ODD_INTS = st.sampled_from([-1, 0, 1, 2, 3, 4, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, 2**64 + 1])
DIM = st.integers(0, 64) | ODD_INTS | st.sampled_from([1.5, "4", None, True, [2]])
NAMES = st.sampled_from(["x", "../etc/passwd", "/abs", "", "__metadata__", "a\x00b"]) | st.text(max_size=20)
VALUES = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -2e4, 1e4, 0.0, -0.0, 1e-40])


HEADER_OPS = ["dtype", "shape", "offsets", "swap", "key+", "key-", "alias", "drop", "rename", "dup", "meta"]
HEADER_OPS += ["pad", "entry"]


@st.composite
def header_edit(draw, header: dict) -> tuple[dict | str, bool]:
    """One edit of the parsed header; returns (new header or raw JSON text, keep the old N)."""
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    op = draw(st.sampled_from(HEADER_OPS))
    if op == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif op == "shape":
        entry["shape"] = draw(
            st.sampled_from([entry["shape"][::-1], entry["shape"] + [1], entry["shape"][:-1], []])
            | st.lists(DIM, max_size=4)
            | st.just(entry["shape"]).map(lambda s: [d + 1 for d in s])
        )
    elif op == "offsets":
        begin, end = entry["data_offsets"]
        delta = st.integers(-8, 8) | ODD_INTS
        entry["data_offsets"] = draw(
            st.sampled_from(
                [[begin + 4, end + 4], [begin - 4, end - 4], [end, begin], [begin], [begin, end, end]]
            )
            | st.tuples(delta, delta).map(lambda d: [begin + d[0], end + d[1]])
            | st.lists(DIM, max_size=3)
        )
    elif op == "swap":  # two tensors exchange their byte ranges (still valid when sizes agree)
        other = header[draw(st.sampled_from(names))]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "key+":
        entry[draw(st.sampled_from(["extra", "offset", "DTYPE"]))] = draw(DIM)
    elif op == "key-":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif op == "alias":  # a new tensor over bytes another one owns
        header[draw(NAMES)] = dict(entry)
    elif op == "drop":
        del header[name]
    elif op == "rename":
        header[draw(NAMES)] = header.pop(name)
    elif op == "dup":  # the same key twice in the JSON text, aliasing or not
        twin = dict(entry) if draw(st.booleans()) else {**entry, "data_offsets": [0, 0], "shape": [0]}
        return json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(twin)}}}", False
    elif op == "meta":
        header["__metadata__"] = draw(
            st.sampled_from([{"k": 1}, [], "x", None, {"format": "pt", "x": "y"}, {"": ""}])
        )
    elif op == "pad":  # trailing spaces are legal (the spec allows them): may be accepted
        return json.dumps(header) + " " * draw(st.integers(1, 16)), False
    else:
        header[name] = draw(st.sampled_from([[], "x", 1, None, {}]))
    return header, draw(st.integers(0, 9)) == 0


def _editable(header: object) -> bool:
    entries = [e for k, e in header.items() if k != "__metadata__"] if isinstance(header, dict) else []
    return bool(entries) and all(
        isinstance(e, dict)
        and isinstance(e.get("shape"), list)
        and all(isinstance(d, int) for d in e["shape"])
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and all(isinstance(o, int) for o in e["data_offsets"])
        for e in entries
    )


def _encode(value: float, dtype: str) -> bytes:
    if dtype == "F32":
        return struct.pack("<f", value)
    if dtype == "F16":
        return struct.pack("<e", value) if abs(value) < 65504 or not math.isfinite(value) else b"\x00\x7c"
    return struct.pack("<f", value)[2:]  # BF16: the high half of the float32


@st.composite
def mutated(draw, family: str) -> bytes:
    data = valid(family)[1]
    for _ in range(draw(st.integers(1, 3))):
        (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
        kind = draw(st.sampled_from(["flip", "truncate", "append", "length", "header", "header", "value"]))
        if kind == "flip" and data:
            hot = min(len(data), 8 + n + 32)  # mostly in the length field and header
            i = draw(st.integers(0, hot - 1) | st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
        elif kind == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "length":
            new = n + draw(st.integers(-3, 3)) if draw(st.booleans()) else draw(ODD_INTS)
            data = struct.pack("<Q", new % 2**64) + data[8:]
        elif kind in ("header", "value"):
            try:
                header, body = split(data)
                assert _editable(header)
            except Exception:  # an earlier mutation broke it: nothing to edit
                continue
            if kind == "header":
                new_header, keep_n = draw(header_edit(header))
                raw = new_header if isinstance(new_header, str) else json.dumps(new_header)
                length = n if keep_n else len(raw.encode())
                data = struct.pack("<Q", length) + raw.encode() + body
            else:
                floats = sorted(
                    k for k, e in header.items() if k != "__metadata__" and e.get("dtype") == "F32"
                )
                if not floats:
                    continue
                entry = header[draw(st.sampled_from(floats))]
                begin, end = entry["data_offsets"]
                at = 8 + n + begin + 4 * draw(st.integers(0, max(0, (end - begin) // 4 - 1)))
                value = draw(VALUES | st.floats(-1e5, 1e5, allow_nan=False, width=32))
                data = data[:at] + _encode(value, "F32") + data[at + 4 :]
    return data


@FAST
@given(st.data())
def test_mutations_of_valid_files(data):
    family = data.draw(st.sampled_from(FAMILIES))
    check(valid(family)[0], data.draw(mutated(family)), family)


def test_the_mutation_oracle_sees_what_it_must():
    """The oracle itself: it passes the valid files and fails known-bad ones (so it can fail)."""
    for family in FAMILIES:
        cfg, data, _ = valid(family)
        assert_truly_valid(family, data)
        assert check(cfg, data, family) is not None
    _, data, _ = valid("lora")
    header, body = split(data)
    name = sorted(k for k in header if k != "__metadata__")[0]
    begin = header[name]["data_offsets"][0]
    with_nan = data[: len(data) - len(body)] + body[:begin] + _encode(math.nan, "F32") + body[begin + 4 :]
    aliased = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    for bad in (data + b"\0", with_nan, assemble(aliased, body)):
        with pytest.raises(AssertionError):
            assert_truly_valid("lora", bad)
    padded = assemble(json.dumps(header) + "    ", body)  # legal: accepted by both
    assert check(valid("lora")[0], padded, "lora") is not None


# ------------------------------------------------------------------------- (c) adapter_config

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
HOSTILE = {
    "auto_map": {"AutoModel": "evil.Model"},
    "auto_mapping": {"base_model_class": "X", "parent_library": "os"},
    "trust_remote_code": True,
    "tokenizer_kwargs": {"trust_remote_code": True},
    "megatron_core": "os",
    "base_model_name_or_path": "/etc/passwd",
    "target_modules": ["../../etc/passwd", "q_proj"],
    "modules_to_save": ["lm_head"],
    "eva_config": {"x": 1},
    "use_dora": True,
    "peft_type": "PROMPT_TUNING",
    "layers_pattern": "os.system",
}
KNOWN_KEYS = sorted({k for f in FAMILIES for k in raw_config(f)} | set(HOSTILE) | {"lora_alpha", "bias"})


@st.composite
def configs(draw) -> bytes:
    base = raw_config(draw(st.sampled_from(FAMILIES)))
    edits = draw(st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), JSON, max_size=4))
    hostile = draw(st.dictionaries(st.sampled_from(sorted(HOSTILE)), st.just(None), max_size=3))
    cfg = {**base, **edits, **{k: HOSTILE[k] for k in hostile}}
    for key in draw(st.lists(st.sampled_from(sorted(cfg)), max_size=2)):
        cfg.pop(key, None)
    return json.dumps(cfg).encode()


def _check_config(raw: bytes) -> None:
    before = set(sys.modules)
    accepted = check(raw, None, None)
    if accepted is None:
        return
    method, cfg = accepted
    parsed = json.loads(raw)
    assert method_for_peft_type(parsed["peft_type"], parsed) is method
    assert set(parsed) <= set(type(cfg).model_fields), sorted(set(parsed) - set(type(cfg).model_fields))
    assert "trust_remote_code" not in parsed and "auto_map" not in parsed and "tokenizer_kwargs" not in parsed
    again = validate_config(json.dumps(cfg.model_dump(mode="json")).encode(), LIMITS)[1]
    assert again == cfg
    strings = {s for s in json.dumps(parsed).replace('"', " ").split() if s.isidentifier()}
    assert not (set(sys.modules) - before) & strings, "validating a config imported a module it names"


@FAST
@given(configs())
def test_configs_with_hostile_and_random_fields(raw):
    _check_config(raw)


@FAST
@given(JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=512))
def test_arbitrary_config_json_and_bytes(raw):
    _check_config(raw)


# ------------------------------------------------------------------------------- slow variants


@pytest.mark.slow
@SLOW
@given(st.data())
def test_mutations_of_valid_files_long(data):
    test_mutations_of_valid_files.hypothesis.inner_test(data)


@pytest.mark.slow
@SLOW
@given(family=st.sampled_from(FAMILIES), blob=st.binary(max_size=8192))
def test_arbitrary_bytes_long(family, blob):
    check(valid(family)[0], blob, family)


@pytest.mark.slow
@SLOW
@given(configs() | JSON.map(lambda v: json.dumps(v).encode()))
def test_configs_long(raw):
    _check_config(raw)
