"""Toy base model shapes, one adapter per family, and raw safetensors byte builders for attacks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from server.methods import Adapter, get_method, parse_config

MODULE_SHAPES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (24, 24),
    "model.layers.0.self_attn.k_proj": (8, 24),
    "model.layers.0.mlp.up_proj": (48, 24),
    "model.layers.0.mlp.down_proj": (24, 48),
}
TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]
BASE = "toy-llama"

FAMILY_CONFIGS: dict[str, dict] = {
    "lora": {"peft_type": "LORA", "r": 4, "lora_alpha": 8},
    "hut": {"peft_type": "HUT", "r": 2, "use_scale_shift": True},
    "ether": {"peft_type": "ETHER", "variant": "etherplus", "side": "both", "n_blocks": 4},
    "dct": {"peft_type": "DCT", "n_frequency": 20, "scaling": 2.0},
    "surm": {"peft_type": "SURM", "variant": "circulant", "alpha": 1.5},
}
FAMILIES = list(FAMILY_CONFIGS)
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def raw_config(family: str = "lora", **extra) -> dict:
    return {"target_modules": TARGETS, **FAMILY_CONFIGS[family], **extra}


def config_bytes(family: str = "lora", **extra) -> bytes:
    return json.dumps(raw_config(family, **extra)).encode()


def make_adapter(family: str = "lora", seed: int = 0, **extra) -> Adapter:
    method, cfg = parse_config(raw_config(family, **extra))
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, shape in MODULE_SHAPES.items():
        weight = torch.randn(shape, generator=g)
        modules[path] = get_method(method.name).init_params(cfg, weight, "random", g)
    return Adapter(method, cfg, modules, dict(MODULE_SHAPES))


def state_dict(family: str = "lora", seed: int = 0, **extra) -> dict[str, torch.Tensor]:
    return make_adapter(family, seed, **extra).state_dict()


def weights_bytes(family: str = "lora", seed: int = 0, **extra) -> bytes:
    return save(state_dict(family, seed, **extra), metadata={"format": "pt"})


def upload(family: str = "lora", seed: int = 0) -> tuple[bytes, bytes]:
    return config_bytes(family), weights_bytes(family, seed)


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file -> (header dict, data section)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def assemble(header: dict | str | bytes, data: bytes, n: int | None = None) -> bytes:
    """Bytes of a safetensors file with the given header (dict, raw JSON text or bytes) and data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def tree(root: Path) -> set[str]:
    """Every file and folder under ``root`` (relative), the SQLite sidecar files excluded."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("index.sqlite3")}


def assert_consistent(store) -> None:
    """Every listed adapter is whole (files present, sha256 matches, loads); nothing else on disk."""
    import hashlib

    from adapters_store import WEIGHTS_NAME

    records, total = store.list(0, 1000)
    assert total == len(records)
    expected_dirs = set()
    for rec in records:
        assert rec.status == "ready", rec
        path = store.file_path(rec.adapter_id, WEIGHTS_NAME)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rec.sha256
        assert store.load(rec.adapter_id, rec.version).family == rec.family
        expected_dirs |= {f"adapters/{rec.adapter_id}", f"adapters/{rec.adapter_id}/v{rec.version}"}
    on_disk = {p for p in tree(store.root) if p.count("/") <= 2 and p.startswith("adapters/")}
    assert on_disk == expected_dirs
    assert list((store.root / "staging").iterdir()) == []
