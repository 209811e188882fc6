"""Our own strict parse of a safetensors header, run before the safetensors library sees a byte.

Layout: 8-byte little-endian ``N``, ``N`` bytes of UTF-8 JSON, then the data section. Beyond the
reference reader's checks (docs/checklist.md) this parse also rejects duplicate JSON
keys (the Rust reader keeps one silently), caps the header, the tensor count, the metadata and
the shape rank, accepts only the dtypes an adapter may use, and requires the tensors to tile the
data section exactly: sorted by offsets, the first starts at 0, each begins where the previous
ended, the last ends at the end of the file (no gaps, overlaps or trailing bytes - no polyglots).
All arithmetic is on Python ints (no overflow).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass

from .errors import TooLarge, ValidationError
from .limits import StoreLimits

# dtype -> bytes per element. I32/I64 are index tensors (DCT positions); whether a tensor may be
# an integer one is decided by its family's ParamSpec in the semantic check.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
WHERE_FILE = "weights"

# Magic numbers of formats people upload by mistake (or on purpose): torch .pt/.bin are zip
# archives of pickles (older ones raw pickles), numpy .npz is a zip.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    header_len: int  # N
    tensors: tuple[TensorEntry, ...]  # sorted by offset
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for json.loads: a repeated key is an error, not "last one wins"."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError("number out of range")
    return value


def strict_json_loads(text: str) -> object:
    """json.loads that rejects duplicate keys, NaN/Infinity literals and out-of-range numbers."""
    return json.loads(
        text, object_pairs_hook=reject_duplicates, parse_constant=_no_constants, parse_float=_finite_float
    )


def lone_surrogate_at(value: object) -> tuple[list, bool] | None:
    """Where the first string (in document order) of a decoded JSON value holds a lone surrogate
    (``"\\ud800"`` decodes to a ``str`` that cannot be UTF-8 encoded): its path, and whether it is an
    object key (then the path names the object). ``None`` if there is none. Iterative: values may
    nest as deep as the JSON parser allows."""
    stack: list[tuple[object, list]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path, False
        elif isinstance(item, dict):
            if any(_SURROGATE.search(key) for key in item):
                return path, True
            stack.extend((v, [*path, k]) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, [*path, i]) for i, v in reversed(list(enumerate(item))))
    return None


def _not_safetensors(detail: str) -> ValidationError:
    return ValidationError(WHERE_FILE, f"not a safetensors file: {detail}")


def sniff_foreign_format(prefix: bytes) -> str | None:
    """Name the format of a file that is obviously not safetensors, else None."""
    if prefix.startswith(_ZIP_MAGIC):
        return "a zip archive (e.g. a torch .bin/.pt checkpoint); only .safetensors is accepted"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "a pickle (e.g. a torch .bin/.pt checkpoint); only .safetensors is accepted"
    if prefix.startswith(b"\x1f\x8b"):
        return "a gzip file; only .safetensors is accepted"
    if prefix.startswith(b"\x93NUMPY"):
        return "a numpy .npy file; only .safetensors is accepted"
    return None


def check_header_length(prefix: bytes, file_size: int, limits: StoreLimits) -> int:
    """Check the 8-byte length prefix against the file size and the cap; return ``N``."""
    foreign = sniff_foreign_format(prefix)
    if foreign is not None:
        raise _not_safetensors(foreign)
    if file_size < 8 or len(prefix) < 8:
        raise _not_safetensors(f"{file_size} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2:
        raise _not_safetensors(f"header length {n} is too small for a JSON object")
    if n > file_size - 8:
        raise _not_safetensors(f"header length {n} exceeds the {file_size - 8} bytes after it")
    if n > limits.max_header_bytes:
        raise TooLarge(
            "max_header_bytes", f"safetensors header of {n} bytes exceeds {limits.max_header_bytes}"
        )
    return n


def _check_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, raw: object, limits: StoreLimits) -> TensorEntry:
    if not isinstance(raw, dict):
        raise ValidationError(name, "header entry must be an object with dtype, shape, data_offsets")
    keys = set(raw)
    if keys != _ENTRY_KEYS:
        extra, missing = sorted(keys - _ENTRY_KEYS), sorted(_ENTRY_KEYS - keys)
        detail = f"unknown keys {extra}" if extra else f"missing keys {missing}"
        raise ValidationError(name, f"header entry: {detail}")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        shown = dtype if isinstance(dtype, str) and len(dtype) <= 16 else "?"
        raise ValidationError(name, f"dtype {shown!r} not allowed (allowed: {sorted(DTYPE_SIZES)})")
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_check_int(d) for d in shape):
        raise ValidationError(name, "shape must be a list of non-negative integers")
    if len(shape) > limits.max_tensor_rank:
        raise ValidationError(name, f"rank {len(shape)} exceeds {limits.max_tensor_rank}")
    offsets = raw["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_check_int(o) for o in offsets)):
        raise ValidationError(name, "data_offsets must be [begin, end] with non-negative integers")
    begin, end = offsets
    if begin > end:
        raise ValidationError(name, f"data_offsets begin {begin} > end {end}")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ValidationError(
            name, f"data_offsets cover {end - begin} bytes but shape {shape} x {dtype} needs {expected}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _metadata(raw: object, limits: StoreLimits) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ValidationError("__metadata__", "must be an object of string keys to string values")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in raw.items())
    if size > limits.max_metadata_bytes:
        raise TooLarge(
            "max_metadata_bytes", f"__metadata__ of {size} bytes exceeds {limits.max_metadata_bytes}"
        )
    return dict(raw)


def parse_header(data: bytes, limits: StoreLimits) -> Header:
    """Parse and check the header of the complete file ``data``; raise ValidationError/TooLarge."""
    n = check_header_length(data[:8], len(data), limits)
    raw_header = data[8 : 8 + n]
    try:
        text = raw_header.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_safetensors("header is not valid UTF-8") from None
    if not text.lstrip(" \t\r\n").startswith("{"):
        raise _not_safetensors("header is not a JSON object")
    try:
        obj = strict_json_loads(text)
    except DuplicateKey as e:
        shown = e.key if len(e.key) <= 200 else e.key[:200] + "..."
        raise ValidationError(shown, "duplicate key in the safetensors header") from None
    except (ValueError, RecursionError):
        raise _not_safetensors("header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _not_safetensors("header is not a JSON object")
    if (found := lone_surrogate_at(obj)) is not None:  # a name or metadata no answer could encode
        where = ".".join(str(p)[:200] for p in found[0]) or WHERE_FILE
        raise ValidationError(where, "the safetensors header is not valid Unicode: a lone surrogate")
    metadata = _metadata(obj.pop("__metadata__"), limits) if "__metadata__" in obj else {}
    if len(obj) > limits.max_tensors:
        raise TooLarge("max_tensors", f"{len(obj)} tensors exceed {limits.max_tensors}")
    entries = sorted((_entry(name, raw, limits) for name, raw in obj.items()), key=lambda e: (e.begin, e.end))
    data_len = len(data) - 8 - n
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise ValidationError(e.name, f"data_offsets [{e.begin}, {e.end}] overlap the previous tensor")
        if e.begin > pos:
            raise ValidationError(e.name, f"data_offsets [{e.begin}, {e.end}] leave a gap after byte {pos}")
        if e.end > data_len:
            raise ValidationError(
                e.name, f"data_offsets end {e.end} is past the end of the data ({data_len})"
            )
        pos = e.end
    if pos != data_len:
        raise ValidationError(
            WHERE_FILE,
            f"{data_len - pos} trailing bytes after the last tensor (data section not fully indexed)",
        )
    return Header(n, tuple(entries), metadata)
