"""LoKr (PEFT ``peft_type: LOKR``): a Kronecker-product update, served on the fly (docs/adapter-format.md).

PEFT factors each side of a linear ``[out, in]`` (its ``factorization``: ``out = l·k``, ``in = m·n``)
and stores ``W1 [l, m]`` and ``W2 [k, n]``, each either whole (``lokr_w1`` / ``lokr_w2``) or as a
rank-r product (``lokr_w1_a [l, r] @ lokr_w1_b [r, m]``, likewise ``w2``), as PEFT's rule picks:
W1 is a product only with ``decompose_both`` and ``r < max(l, m) / 2``, W2 when ``r < max(k, n) / 2``.

    ΔW = s · W1 ⊗ W2,   s = alpha / r,   i.e.   ΔW[(a, b), (c, d)] = s · W1[a, c] · W2[b, d].

On the fly with ``X = x.view(m, n)`` per row: ``Δy = s · vec(W1 X W2ᵀ)``, i.e. ``in·k + l·m·k``
multiply-adds per token, far below a dense update (``prepare`` folds s into W1).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, StrictBool, StrictInt

from .base import (
    MAX_RANK,
    AdapterMethod,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    Scale,
    StrictNumber,
    per_row,
)
from .registry import register_method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split ``dimension = m·n`` (m <= n): ``factor`` if it divides, else the divisor pair
    nearest the square root with m <= factor (``-1``: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LokrConfig(PeftConfig):
    r: StrictInt = Field(8, ge=1, le=MAX_RANK)
    alpha: Scale = 8.0
    decompose_both: StrictBool = False
    decompose_factor: StrictInt = Field(-1, ge=-1)
    rank_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    module_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    rank_dropout_scale: StrictBool = False  # training only
    use_effective_conv2d: StrictBool = False  # convolutions only: no effect on a linear
    init_weights: StrictBool | Literal["lycoris"] = True  # init only
    peft_version: str | None = None
    rank_pattern: Any = Field(default_factory=dict)
    alpha_pattern: Any = Field(default_factory=dict)

    def factors(self, out_f: int, in_f: int) -> tuple[int, int, int, int]:
        """(l, k, m, n): out = l·k, in = m·n, as PEFT splits them."""
        f = self.decompose_factor
        (l_, k), (m, n) = factorization(out_f, f), factorization(in_f, f)
        return l_, k, m, n

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LokrMethod(AdapterMethod):
    name: ClassVar[str] = "lokr"
    peft_type: ClassVar[str] = "LOKR"
    config_cls: ClassVar[type[MethodConfig]] = LokrConfig

    def param_specs(self, cfg: LokrConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        l_, k, m, n = cfg.factors(out_f, in_f)
        r = cfg.r
        if cfg.decompose_both and r < max(l_, m) / 2:
            specs = {"lokr_w1_a": ParamSpec((l_, r)), "lokr_w1_b": ParamSpec((r, m))}
        else:
            specs = {"lokr_w1": ParamSpec((l_, m))}
        if r < max(k, n) / 2:
            return specs | {"lokr_w2_a": ParamSpec((k, r)), "lokr_w2_b": ParamSpec((r, n))}
        return specs | {"lokr_w2": ParamSpec((k, n))}

    def init_params(
        self, cfg: LokrConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """PEFT's: W1 (or W1a) zero, the rest Kaiming-uniform (ΔW = 0); ``random``: all random."""
        dev = weight.device
        out = {}
        for name, spec in self.param_specs(cfg, *weight.shape).items():
            t = (torch.rand(spec.shape, generator=generator, device=dev) * 2 - 1) / math.sqrt(spec.shape[1])
            if mode != "random" and name in ("lokr_w1", "lokr_w1_a"):
                t = torch.zeros(spec.shape, device=dev)
            out[name] = t
        if mode == "random":  # rescale W1 so that std(ΔW) = 0.3·std(W): clearly visible at W's scale
            w1, w2 = self._factors(out)
            now = abs(cfg.scaling) * float(w1.std() * w2.std())
            first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
            out[first] = out[first] * (0.3 * weight.float().std().clamp_min(1e-3).item() / max(now, 1e-12))
        return out

    @staticmethod
    def _factors(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
        w2 = params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_a"] @ params["lokr_w2_b"]
        return w1, w2

    def reference_weight(self, cfg: LokrConfig, params, weight, bias):
        w1, w2 = self._factors(params)
        delta = torch.zeros_like(weight)
        k, n = w2.shape
        for a in range(w1.shape[0]):  # the block (a, c) of W1 ⊗ W2 is W1[a, c] · W2
            for c in range(w1.shape[1]):
                delta[a * k : (a + 1) * k, c * n : (c + 1) * n] = w1[a, c] * w2
        return weight + cfg.scaling * delta, bias

    def merged_weight(self, cfg: LokrConfig, params, weight, bias):
        w1, w2 = self._factors(params)
        return weight + cfg.scaling * torch.kron(w1, w2), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: LokrConfig, out_f: int, in_f: int) -> Hashable:
        return ("lokr", *cfg.factors(out_f, in_f))

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"delta"})

    def prepare(self, cfg: LokrConfig, params, weight):
        w1, w2 = self._factors(params)
        return {"W1": (w1 * cfg.scaling).to(weight.dtype), "W2": w2.to(weight.dtype)}  # [l, m], [k, n]

    def delta(self, sig, x, table, slots, weight):
        _, l_, k, m, n = sig
        w1, w2 = per_row(table["W1"], slots), per_row(table["W2"], slots)  # [R|1, l, m], [R|1, k, n]
        xs = x.view(-1, m, n)
        t = torch.matmul(xs, w2.transpose(1, 2))  # [R, m, k]
        return torch.matmul(w1, t).reshape(x.shape[0], l_ * k)  # [R, l, k] -> [R, out]


register_method(LokrMethod())
