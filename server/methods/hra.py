"""HRA: Householder reflection adaptation (PEFT ``peft_type: HRA``), docs/adapter-format.md.

PEFT stores ``U = hra_u [in, r]`` per linear and right-multiplies the weight by an orthogonal
``H [in, in]``:

    W' = W H,   b' = b
    apply_GS false:  H = H_1 H_2 … H_r,   H_i = I − 2 û_i û_iᵀ,   û_i = u_i / ‖u_i‖
    apply_GS true:   H = I − 2 Q Qᵀ,      Q = Gram–Schmidt(u_1, …, u_r)   (orthonormal columns)

On the fly ``x W'ᵀ = (x Hᵀ) Wᵀ``: an input-side transform before the shared GEMM, ``x Hᵀ`` =
x reflected by û_r, then û_{r−1}, …, û_1 (``2·r·in`` multiply-adds per token), or with GS
``x − 2 (x Q) Qᵀ`` in one step (the reflections commute). r = 1 is ETHER's one-sided reflection
with n_blocks = 1. ``prepare`` stores the unit vectors, in application order, as ``[r, in]``.

Init (PEFT's ``init_weights``): even r without GS pairs equal columns (H_{2k} H_{2k+1} = I: W' = W);
odd r or GS has no identity (as PEFT, Kaiming-uniform columns for training).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt

from .base import (
    MAX_RANK,
    AdapterMethod,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    WeightsError,
    per_row,
)
from .registry import register_method

MIN_RMS = 1e-6  # a column whose RMS entry is below this has no direction worth normalising


class HraConfig(PeftConfig):
    r: StrictInt = Field(8, ge=1, le=MAX_RANK)
    apply_GS: StrictBool = False  # noqa: N815  (PEFT's name)
    init_weights: StrictBool = True  # init only
    peft_version: str | None = None

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.r > in_f:
            raise ConfigError("r", f"r={self.r} exceeds in_features={in_f} of {module}")


def unit_vectors(cfg: HraConfig, u: torch.Tensor) -> torch.Tensor:
    """``[r, in]`` unit vectors in the order ``pre`` applies them (PEFT's normalisation)."""
    if not cfg.apply_GS:
        return (u / torch.linalg.vector_norm(u, dim=0)).T.flip(0)  # û_r first
    q: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for w in q:
            v = v - (w @ v) * w
        q.append(v / torch.linalg.vector_norm(v))
    return torch.stack(q)


class HraMethod(AdapterMethod):
    name: ClassVar[str] = "hra"
    peft_type: ClassVar[str] = "HRA"
    config_cls: ClassVar[type[MethodConfig]] = HraConfig

    def param_specs(self, cfg: HraConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {"hra_u": ParamSpec((in_f, cfg.r))}

    def check_params(self, cfg, module, params, out_f, in_f) -> None:
        rms = params["hra_u"].float().pow(2).mean(dim=0).sqrt()
        if not bool((rms >= MIN_RMS).all()):
            raise WeightsError(
                f"base_model.model.{module}.hra_u",
                f"a column has RMS entry {float(rms.min()):.3g} < {MIN_RMS:g}: no direction to reflect in",
            )

    def init_params(
        self, cfg: HraConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        in_f, r, dev = weight.shape[1], cfg.r, weight.device
        if mode == "random":
            return {"hra_u": torch.randn(in_f, r, generator=generator, device=dev)}
        bound = 1.0 / math.sqrt(r if r % 2 or cfg.apply_GS else r // 2)  # kaiming_uniform_(a=√5) of [in, r]
        if r % 2 or cfg.apply_GS:
            if mode == "identity":
                raise ConfigError("r", "HRA has an identity init only for an even r without apply_GS")
            return {"hra_u": (torch.rand(in_f, r, generator=generator, device=dev) * 2 - 1) * bound}
        half = (torch.rand(in_f, r // 2, generator=generator, device=dev) * 2 - 1) * bound
        return {"hra_u": torch.repeat_interleave(half, 2, dim=1)}

    def _h(self, cfg: HraConfig, u: torch.Tensor) -> torch.Tensor:
        """The dense ``H`` exactly as PEFT builds it."""
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        if cfg.apply_GS:
            q = unit_vectors(cfg, u).T
            return eye - 2 * q @ q.T
        h = eye
        for i in range(u.shape[1]):
            ui = (u[:, i] / torch.linalg.vector_norm(u[:, i]))[:, None]
            h = h - 2 * h @ ui @ ui.T
        return h

    def reference_weight(self, cfg: HraConfig, params, weight, bias):
        return weight @ self._h(cfg, params["hra_u"]), bias

    def merged_weight(self, cfg: HraConfig, params, weight, bias):
        v = unit_vectors(cfg, params["hra_u"])  # W H = ((W H_1) H_2) …: reflect W's rows
        w = weight
        if cfg.apply_GS:
            return w - 2 * (w @ v.T) @ v, bias
        for k in range(v.shape[0] - 1, -1, -1):  # û_1 first
            w = w - 2 * (w @ v[k])[:, None] * v[k]
        return w, bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: HraConfig, out_f: int, in_f: int) -> Hashable:
        return ("hra", cfg.r, cfg.apply_GS)

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"pre"})

    def prepare(self, cfg: HraConfig, params, weight):
        return {"U": unit_vectors(cfg, params["hra_u"]).to(weight.dtype)}  # [r, in]

    def pre(self, sig, x, table, slots):
        v = per_row(table["U"], slots)  # [R|1, r, in]
        if sig[2]:  # orthonormal: x − 2 (x Q) Qᵀ at once
            coef = (x.unsqueeze(1) * v).sum(-1)  # [R, r]
            return x - 2 * (coef.unsqueeze(-1) * v).sum(1)
        for k in range(v.shape[1]):
            vk = v[:, k]
            x = x - 2 * (x * vk).sum(-1, keepdim=True) * vk
        return x


register_method(HraMethod())
