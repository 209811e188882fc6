"""Builders shared by the engine tests."""

from __future__ import annotations

import copy

import torch

from server.engine.engine import Engine
from server.engine.loader import wrap_model
from server.methods import Adapter, get_method
from server.settings import Settings
from tests.methods.cases import merge_into

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
    # dtype pinned: the exactness tests are float32 whatever `auto` would pick on this CPU.
    settings = Settings(
        **{
            "dtype": "float32",
            "max_batch_size": 16,
            "device_adapter_bytes": 64 << 20,
            "kv_cache_bytes": 16 << 20,  # 64k tokens of the tiny model
            **overrides,
        }
    )
    return Engine(base, settings), reference


def merged_copy(reference: torch.nn.Module, adapter: Adapter | None) -> torch.nn.Module:
    model = copy.deepcopy(reference)
    if adapter is not None:
        for path, params in adapter.modules.items():
            merge_into(model.get_submodule(path), adapter.method, adapter.config, params)
    return model


# Two float32 computations of the same logits in another summation order (another batch shape,
# thread count or SIMD width) differ by about eps · (reduction length) · |logit|; the tiny models'
# reductions are at most a few hundred terms deep. Within this margin the two best tokens are a tie
# that the order decides, and greedy decoding may legitimately take either.
TIE_MARGIN = torch.finfo(torch.float32).eps * 1024


def assert_greedy_matches(got: list[int], model: torch.nn.Module, prompt: list[int], n: int, what: str = ""):
    """``got`` is the greedy continuation of ``prompt`` on ``model`` (plain ``generate``).

    Token for token, except at a near-tie: where ``got`` first takes another token, the reference's
    logits must rate the two within ``TIE_MARGIN`` (relative to their scale); from there on the two
    continuations are of different prefixes and are not compared.
    """
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref = out.sequences[0, len(prompt) :].tolist()
    assert len(got) == len(ref), f"{what}: {len(got)} tokens, the reference has {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g != r:
            logits = out.logits[i][0].float()
            gap = float(logits[r] - logits[g])
            tol = TIE_MARGIN * max(1.0, float(logits.abs().max()))
            assert gap <= tol, f"{what}: token {i} is {g}; the reference's {r} is {gap:.3g} > {tol:.3g} ahead"
            return
