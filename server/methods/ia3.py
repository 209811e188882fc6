"""IA3 (PEFT ``peft_type: IA3``), served exactly as HUT rank 1 (docs/adapter-format.md, PEFT types).

PEFT stores one vector ``l = ia3_l`` per linear: ``[out, 1]`` on most modules, where

    y = l ⊙ (x Wᵀ + b)          (the bias is scaled too)

and ``[1, in]`` on ``feedforward_modules`` (PEFT's rule: a string is a full regex match of the
module path, a list matches paths that end with an entry), where

    y = (l ⊙ x) Wᵀ + b.

HUT rank 1 is ``y = γ ⊙ ((b_0 ⊙ x) Wᵀ) + β + b``: an output-side ``l`` is ``a_0 = l, b_0 = 1,
β = (l - 1) ⊙ b``, an input-side one ``a_0 = 1, b_0 = l``, with γ = 1. The engine gives ``prepare``
the linear's bias for that β (``prepare_uses_bias``). Cost per token: HUT rank 1 (one row
scale before the shared GEMM, one scale-and-shift after).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from pydantic import StrictBool

from .base import ConfigError, InitMode, MethodConfig, ParamSpec, PeftConfig
from .converted import ConvertedMethod
from .hut import HutConfig, HutMethod
from .registry import register_method


class Ia3Config(PeftConfig):
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: StrictBool = True  # init only
    peft_version: str | None = None

    def is_feedforward(self, module: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(t) for t in ff)


class Ia3Method(ConvertedMethod):
    name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    config_cls: ClassVar[type[MethodConfig]] = Ia3Config
    family: ClassVar[HutMethod] = HutMethod()
    prepare_uses_bias: ClassVar[bool] = True

    def param_specs(self, cfg: Ia3Config, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {"ia3_l": ParamSpec((out_f, 1))}  # a module that is not a feedforward one

    def module_specs(self, cfg: Ia3Config, module: str, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {"ia3_l": ParamSpec((1, in_f) if cfg.is_feedforward(module) else (out_f, 1))}

    def init_params(
        self, cfg: Ia3Config, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Output side (``param_specs``): ones (PEFT's init, W' = W), or 1 ± 0.3 random."""
        out_f = weight.shape[0]
        if mode == "random":
            return {"ia3_l": 1.0 + 0.3 * torch.randn(out_f, 1, generator=generator, device=weight.device)}
        return {"ia3_l": torch.ones(out_f, 1, device=weight.device)}

    def init_module_params(self, cfg, module, weight, mode, generator):
        params = self.init_params(cfg, weight, mode, generator)
        if not cfg.is_feedforward(module):
            return params
        in_f = weight.shape[1]
        if mode == "random":
            return {"ia3_l": 1.0 + 0.3 * torch.randn(1, in_f, generator=generator, device=weight.device)}
        return {"ia3_l": torch.ones(1, in_f, device=weight.device)}

    def check_params(self, cfg, module, params, out_f, in_f) -> None:
        if out_f == 1 and in_f == 1:  # [1, 1] says nothing about the side
            raise ConfigError("target_modules", f"IA3 on the 1x1 linear {module} is ambiguous")

    # ---- conversion ----------------------------------------------------------------------
    def family_config(self, cfg: Ia3Config) -> HutConfig:
        return HutConfig(peft_type="HUT", target_modules=cfg.target_modules, r=1, use_scale_shift=True)

    def family_params(self, cfg, params, weight, bias=None):
        out_f, in_f = weight.shape
        lam = params["ia3_l"]
        ones_out, ones_in = lam.new_ones(out_f, 1), lam.new_ones(1, in_f)
        if tuple(lam.shape) == (1, in_f) != (out_f, 1):
            return {  # input side: (l ⊙ x) Wᵀ + b
                "hut_A": ones_out,
                "hut_B": lam,
                "hut_gamma": ones_out[:, 0],
                "hut_beta": lam.new_zeros(out_f),
            }
        scale = lam[:, 0]  # output side: l ⊙ (x Wᵀ + b)
        beta = lam.new_zeros(out_f) if bias is None else (scale - 1) * bias
        return {"hut_A": lam, "hut_B": ones_in, "hut_gamma": ones_out[:, 0], "hut_beta": beta}


register_method(Ia3Method())
