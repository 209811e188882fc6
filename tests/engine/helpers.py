"""Builders shared by the engine tests."""

from __future__ import annotations

import copy

import torch

from server.engine.engine import Engine
from server.engine.loader import wrap_model
from server.methods import Adapter, get_method, merge_into
from server.settings import Settings

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(
    case_family: str, config: dict, shapes: dict, weights: dict, seed: int, scale: float = 0.3
):
    """An adapter with random non-zero parameters on every target module."""
    method = get_method(case_family)
    cfg = method.parse_config({"peft_type": case_family.upper(), "target_modules": TARGETS, **config})
    g = torch.Generator().manual_seed(seed)
    modules = {p: method.init_params(cfg, weights[p], "random", g) for p in shapes}
    return Adapter(method, cfg, modules, dict(shapes))


def make_engine(model, tokenizer, **overrides) -> tuple[Engine, torch.nn.Module]:
    """Wrap ``model`` for serving; returns the engine and an untouched copy for references."""
    reference = copy.deepcopy(model)
    base = wrap_model("tiny", model, tokenizer, TARGETS)
    settings = Settings(**{"max_batch_size": 16, "device_adapter_bytes": 64 << 20, **overrides})
    return Engine(base, settings), reference


def merged_copy(reference: torch.nn.Module, adapter: Adapter | None) -> torch.nn.Module:
    model = copy.deepcopy(reference)
    if adapter is not None:
        for path, params in adapter.modules.items():
            merge_into(model.get_submodule(path), adapter.method, adapter.config, params)
    return model


def greedy_alone(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()
