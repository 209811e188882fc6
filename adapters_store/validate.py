"""Strict validation of an adapter upload, done entirely in memory before anything is stored.

Pipeline (docs/checklist.md, "The upload pipeline"):

config  size cap -> UTF-8 -> JSON object (duplicate keys, NaN/Infinity, deep nesting rejected)
        -> ``server.methods.parse_config`` (pydantic allowlist per family: unknown fields and
        anything that could import code or point at files are rejected).
weights size cap -> our own strict safetensors header parse (``safetensors_header``)
        -> ``safetensors.torch.load(bytes)`` (pure data: never torch.load, never pickle)
        -> ``Adapter.from_state_dict`` (names, shapes, dtypes, finite values vs the base model)
        -> magnitude cap ``|x| <= limits.max_abs_value`` on every float tensor
        -> the family's ``prepare`` (the slot tables the engine will install, scales folded in)
        must be finite in the serving dtype (``check_tables``).

Every failure raises a ``StoreError`` subclass naming the field, tensor or limit at fault.
``base_model_name_or_path`` in a config is kept as data and never acted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from server.methods import Adapter, AdapterError, AdapterMethod, MethodConfig, check_tables, parse_config

from .errors import Conflict, Corrupt, NotFound, StoreError, TooLarge, ValidationError
from .limits import StoreLimits
from .safetensors_header import (
    WHERE_FILE,
    DuplicateKey,
    Header,
    check_header_length,
    lone_surrogate_at,
    parse_header,
)
from .safetensors_header import strict_json_loads as _strict_json_loads

__all__ = [
    "Conflict",
    "Corrupt",
    "NotFound",
    "StoreError",
    "TooLarge",
    "ValidatedUpload",
    "ValidationError",
    "canonical_config_bytes",
    "read_weights",
    "validate_config",
    "validate_upload",
    "validate_weights",
]

WHERE_CONFIG = "config"


@dataclass(frozen=True)
class ValidatedUpload:
    adapter: Adapter
    config: dict  # the parsed config with every default filled in (what is stored)
    config_bytes: bytes  # canonical JSON of ``config``, written as adapter_config.json
    weights: bytes  # the exact bytes validated, written as adapter_model.safetensors
    sha256: str  # of ``weights``
    header: Header

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def trainable_params(self) -> int:
        return self.adapter.trainable_count()


def _from_adapter_error(e: AdapterError) -> ValidationError:
    text = str(e)
    prefix = f"{e.where}: "
    return ValidationError(e.where, text[len(prefix) :] if text.startswith(prefix) else text)


def validate_config(config_bytes: bytes, limits: StoreLimits) -> tuple[AdapterMethod, MethodConfig]:
    if not isinstance(config_bytes, bytes | bytearray | memoryview):
        raise ValidationError(WHERE_CONFIG, "adapter_config.json must be given as bytes")
    if len(config_bytes) > limits.max_config_bytes:
        raise TooLarge(
            "max_config_bytes",
            f"adapter_config.json of {len(config_bytes)} bytes exceeds {limits.max_config_bytes}",
        )
    try:
        text = bytes(config_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(WHERE_CONFIG, "adapter_config.json is not valid UTF-8") from None
    try:
        raw = _strict_json_loads(text)
    except DuplicateKey as e:
        shown = e.key if len(e.key) <= 200 else e.key[:200] + "..."
        raise ValidationError(shown, "duplicate key in adapter_config.json") from None
    except RecursionError:
        raise ValidationError(WHERE_CONFIG, "adapter_config.json is nested too deeply") from None
    except ValueError as e:
        msg = getattr(e, "msg", None) or "not valid JSON"
        raise ValidationError(WHERE_CONFIG, f"adapter_config.json is not valid JSON ({msg})") from None
    if not isinstance(raw, dict):
        raise ValidationError(WHERE_CONFIG, "adapter_config.json must be a JSON object")
    if (found := lone_surrogate_at(raw)) is not None:  # "\ud800": stored, it breaks every answer
        where = ".".join(str(p)[:200] for p in found[0]) or WHERE_CONFIG
        raise ValidationError(where, "not valid Unicode: a lone surrogate (\\ud800-\\udfff)")
    try:
        return parse_config(raw)
    except AdapterError as e:
        raise _from_adapter_error(e) from None


def canonical_config_bytes(cfg: MethodConfig) -> tuple[dict, bytes]:
    data = cfg.model_dump(mode="json")
    return data, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def read_weights(weights_file: Path | bytes, limits: StoreLimits) -> bytes:
    """The whole weights file in memory, refusing oversized files and bad headers before reading all."""
    cap = limits.max_weights_bytes
    if isinstance(weights_file, bytes | bytearray | memoryview):
        data = bytes(weights_file)
        if len(data) > cap:
            raise TooLarge("max_weights_bytes", f"weights file of {len(data)} bytes exceeds {cap}")
        return data
    if not isinstance(weights_file, str | os.PathLike):
        raise ValidationError(WHERE_FILE, "weights must be given as bytes or a file path")
    try:
        fd = os.open(weights_file, os.O_RDONLY)
    except OSError:
        raise ValidationError(WHERE_FILE, "weights file cannot be read") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(WHERE_FILE, "weights file is not a regular file")
        if st.st_size > cap:
            raise TooLarge("max_weights_bytes", f"weights file of {st.st_size} bytes exceeds {cap}")
        prefix = f.read(8)
        # Header length vs file size and the header cap, before reading the rest into memory.
        check_header_length(prefix, st.st_size, limits)
        rest = f.read(cap + 1 - len(prefix))
    data = prefix + rest
    if len(data) > cap:
        raise TooLarge("max_weights_bytes", f"weights file exceeds {cap} bytes")
    return data


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception:  # SafetensorError and friends; our header parse already passed
        raise ValidationError(
            WHERE_FILE, "not a safetensors file: rejected by the safetensors reader"
        ) from None


def check_magnitudes(tensors: Mapping[str, torch.Tensor], limit: float) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.detach().abs().amax().float())
        if not peak <= limit:  # also catches NaN/Inf should they get here
            raise ValidationError(name, f"value of magnitude {peak:.3g} exceeds max_abs_value {limit:g}")


def validate_weights(
    method: AdapterMethod,
    cfg: MethodConfig,
    data: bytes,
    module_shapes: Mapping[str, tuple[int, int]],
    limits: StoreLimits,
    table_dtype: torch.dtype = torch.float32,
) -> tuple[Header, Adapter]:
    if len(data) > limits.max_weights_bytes:
        raise TooLarge(
            "max_weights_bytes", f"weights file of {len(data)} bytes exceeds {limits.max_weights_bytes}"
        )
    header = parse_header(data, limits)
    tensors = _load_tensors(data)
    if set(tensors) != {e.name for e in header.tensors}:  # cannot happen after parse_header; be sure
        raise ValidationError(WHERE_FILE, "safetensors reader and header disagree on tensor names")
    try:
        adapter = Adapter.from_state_dict(method, cfg, tensors, module_shapes)
    except AdapterError as e:
        raise _from_adapter_error(e) from None
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError):
        raise ValidationError(WHERE_FILE, "tensors failed the family's semantic checks") from None
    check_magnitudes(tensors, limits.max_abs_value)
    try:
        check_tables(adapter, table_dtype)
    except AdapterError as e:
        raise _from_adapter_error(e) from None
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError):
        raise ValidationError(WHERE_FILE, "tensors failed the family's serving preparation") from None
    return header, adapter


def validate_upload(
    config_bytes: bytes,
    weights_file: Path | bytes,
    module_shapes: Mapping[str, tuple[int, int]],
    limits: StoreLimits,
    table_dtype: torch.dtype = torch.float32,
) -> ValidatedUpload:
    """Validate a whole upload; raise a StoreError subclass or return what is to be stored.

    ``table_dtype``: the dtype the engine serves in (its slot tables are cast to it).
    """
    method, cfg = validate_config(config_bytes, limits)
    data = read_weights(weights_file, limits)
    header, adapter = validate_weights(method, cfg, data, module_shapes, limits, table_dtype)
    config, canonical = canonical_config_bytes(cfg)
    return ValidatedUpload(adapter, config, canonical, data, hashlib.sha256(data).hexdigest(), header)
