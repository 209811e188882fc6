"""Hostile-but-accepted adapters and poisoned slot tables, shared by the isolation tests.

"Largest accepted": the family's scale at its bound (``MAX_SCALE``) and every float tensor at
the store's magnitude cap (``StoreLimits.max_abs_value``) with random signs, so the adapter passes
upload validation and drives its own rows as far as anything accepted can. "Poisoned" tables go
further than validation allows (inf, NaN, near float32's max): the engine must still keep them
out of every other row, because isolation is per-row selection, not a property of the values.
"""

from __future__ import annotations

import torch

from adapters_store import StoreLimits
from server.methods import Adapter, MethodConfig, get_method
from server.methods.base import MAX_SCALE

SCALE_FIELD = {"lora": "lora_alpha", "dct": "scaling", "surm": "alpha"}  # HUT and ETHER have none
POISONS = {
    "inf": float("inf"),
    "-inf": float("-inf"),
    "nan": float("nan"),
    "huge": 3e38,  # finite in float32, inf once anything is added or it is cast to bfloat16
}


def at_bound(t: torch.Tensor, g: torch.Generator, limit: float = StoreLimits().max_abs_value) -> torch.Tensor:
    """Every entry ±``limit`` (random signs), for float tensors; index tensors as they are."""
    if not t.is_floating_point():
        return t
    sign = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
    return sign * limit


def largest_accepted_config(family: str, raw: dict) -> MethodConfig:
    """``raw`` (a valid config) with the family's scale, if it has one, at +MAX_SCALE."""
    field = SCALE_FIELD.get(family)
    return get_method(family).parse_config({**raw, **({field: MAX_SCALE} if field else {})})


def largest_accepted(
    family: str, raw: dict, shapes: dict[str, tuple[int, int]], weights: dict[str, torch.Tensor], seed: int
) -> Adapter:
    """The largest accepted adapter of ``family`` on ``shapes`` (same signature as ``raw``)."""
    method = get_method(family)
    cfg = largest_accepted_config(family, raw)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in shapes:
        params = method.init_params(cfg, weights[path].float(), "random", g)
        modules[path] = {k: at_bound(v, g) for k, v in params.items()}
    return Adapter(method, cfg, modules, dict(shapes))


def poisoned(table: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """A prepared table with every float entry set to ``value`` (alternating sign for finite ones)."""
    out = {}
    for name, t in table.items():
        if not t.is_floating_point():
            out[name] = t  # positions stay valid: the kernels check them (and would refuse the call)
            continue
        fill = torch.full(t.shape, value, dtype=t.dtype)
        if value == value and abs(value) != float("inf"):
            fill.view(-1)[1::2] *= -1
        out[name] = fill
    return out
