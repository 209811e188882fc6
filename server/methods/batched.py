"""The batched adapted linear: one shared base GEMM, each family's row-local work around it.

A *group* is the set of token rows of one step that use one (family, signature) slot table.
``rows`` are the row indices in the flattened ``[N, in]`` activations, ``slots`` the slot of
each of those rows in the group's table. Groups are built once per step by the engine and
passed down explicitly; nothing here keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import AdapterMethod, MethodConfig


@dataclass
class Group:
    method: AdapterMethod
    sig: Hashable
    table: dict[str, torch.Tensor]  # name -> [S, ...] stacked per-slot tensors
    rows: torch.Tensor | None  # [R] long, or None = every row of the batch
    slots: torch.Tensor | None  # [R] long, or None = every row uses entry 0
    # hook -> in-place fused replacement ``f(target, x, group)`` (the engine's CPU kernels,
    # server/kernels); used only for float32 and bfloat16 CPU rows outside autograd.
    fused: dict[str, Callable] = field(default_factory=dict)

    def __post_init__(self):
        self.hooks = self.method.hooks(self.sig)


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def fusable(x2: torch.Tensor) -> bool:
    """Whether the fused CPU kernels may take these ``[N, in]`` rows (serving, not training)."""
    return (
        x2.device.type == "cpu"
        and x2.dtype in (torch.float32, torch.bfloat16)
        and x2.is_contiguous()
        and not torch.is_grad_enabled()
    )


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over rows of different requests, each row's result depending on that row alone.

    oneDNN's bfloat16 GEMM on AMX CPUs breaks this for an odd input width: with 17 rows or more, a
    row holding inf or NaN turns other rows' outputs into NaN (measured with torch 2.13 on a
    Xeon with AMX, K = 7, 15, 21, 33, 575; never for an even K, nor on AVX-512-BF16 alone). The
    packing pairs bfloat16 values along K and pads the odd tail with a neighbour's element: 0 x inf.
    One zero column on both operands makes K even; it adds exact zeros to each dot product. Only
    bfloat16 CPU rows with an odd width pay the copy, on every CPU, so results never depend on it.
    Not covered: the other bfloat16 GEMMs over several requests' rows, which an odd width would
    expose the same way (the base linear and merged adapters, and ``torch.bmm`` with an odd
    reduction, e.g. LoRA's segmented torch path at an odd rank; see docs/engine.md).
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.shape[-1] % 2:
        return F.linear(F.pad(x, (0, 1)), F.pad(weight, (0, 1)), bias)
    return F.linear(x, weight, bias)


def batched_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: Sequence[Group]
) -> torch.Tensor:
    """``y[i] = x[i] W_i'^T + b_i'`` where row i's adapter is given by its group (or none)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not groups:
        return rows_linear(x, weight, bias)
    kernels_ok = fusable(x2)

    def fused(g: Group, hook: str) -> Callable | None:
        return g.fused.get(hook) if kernels_ok and g.rows is not None else None

    xin = x2
    for g in groups:
        if "pre" in g.hooks:
            if xin is x2 and g.rows is not None:
                xin = x2.clone()
            if (f := fused(g, "pre")) is not None:
                f(xin, x2, g)
                continue
            new = g.method.pre(g.sig, _take(x2, g.rows), g.table, g.slots)
            if g.rows is None:
                xin = new
            else:
                xin.index_copy_(0, g.rows, new)
    posts = [g for g in groups if "post" in g.hooks]
    # Without output-side transforms the bias can ride in the shared GEMM (one addmm).
    y = rows_linear(xin, weight, None if posts else bias)
    for g in posts:
        if (f := fused(g, "post")) is not None:
            f(y, x2, g)
            continue
        new = g.method.post(g.sig, _take(y, g.rows), g.table, g.slots)
        if g.rows is None:
            y = new
        else:  # in place: y is a fresh result the GEMM's backward does not need
            y.index_copy_(0, g.rows, new)
    for g in groups:
        if "delta" in g.hooks:
            if (f := fused(g, "delta")) is not None:
                f(y, x2, g)
                continue
            d = g.method.delta(g.sig, _take(x2, g.rows), g.table, g.slots, weight)
            if g.rows is None:
                y = y + d.to(y.dtype)
            else:
                y.index_add_(0, g.rows, d.to(y.dtype))
    if posts and bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def stack_prepared(prepared: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-adapter ``prepare`` outputs (same signature) into a slot table."""
    return {k: torch.stack([p[k] for p in prepared]) for k in prepared[0]}


def adapted_forward(
    method: AdapterMethod,
    cfg: MethodConfig,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Training forward for one adapter on every row: autograd flows into ``params`` only."""
    out_f, in_f = weight.shape
    sig = method.signature(cfg, out_f, in_f)
    extra = {"bias": bias} if method.prepare_uses_bias else {}  # IA3 scales the bias too
    table = {k: v.unsqueeze(0) for k, v in method.prepare(cfg, params, weight, **extra).items()}
    return batched_linear(x, weight, bias, [Group(method, sig, table, None, None)])
