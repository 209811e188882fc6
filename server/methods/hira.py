"""HiRA (PEFT ``peft_type: HIRA``), served exactly as HUT rank r+1 (docs/adapter-format.md).

PEFT stores ``A = hira_A [r, in]`` and ``B = hira_B [out, r]`` and computes (no scaling factor)

    y = x Wᵀ + b + x (W ⊙ (B A))ᵀ,   i.e.   W' = W ⊙ (1 + B A).

``1 + B A = [1 | B] [1 ; A]`` is a rank-(r+1) mask, so HiRA is HUT with ``hut_A = [1 | B]``,
``hut_B = [1 ; A]`` (γ = 1, β = 0): its k = 0 term is the base GEMM itself and the r further terms
are GEMMs, so the engine serves HiRA adapters merged (HUT's ``serving_cost`` for r > 1).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt

from .base import (
    MAX_RANK,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    StrictNumber,
)
from .converted import ConvertedMethod
from .hut import HutConfig, HutMethod
from .registry import register_method


class HiraConfig(PeftConfig):
    r: StrictInt = Field(32, ge=1, le=MAX_RANK)
    hira_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    init_weights: StrictBool | str | None = True  # init only
    peft_version: str | None = None
    rank_pattern: Any = Field(default_factory=dict)

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.r + 1 > min(out_f, in_f):
            raise ConfigError(
                "r",
                f"r={self.r} (HUT rank r+1) exceeds min(out={out_f}, in={in_f}) - 1 of {module}",
            )


class HiraMethod(ConvertedMethod):
    name: ClassVar[str] = "hira"
    peft_type: ClassVar[str] = "HIRA"
    config_cls: ClassVar[type[MethodConfig]] = HiraConfig
    family: ClassVar[HutMethod] = HutMethod()

    def param_specs(self, cfg: HiraConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {"hira_A": ParamSpec((cfg.r, in_f)), "hira_B": ParamSpec((out_f, cfg.r))}

    def init_params(
        self, cfg: HiraConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """PEFT's: A Kaiming-uniform U(±1/√in), B = 0 (W' = W); ``random`` draws B ~ N(0, 0.3/√r)."""
        out_f, in_f = weight.shape
        dev = weight.device
        a = (torch.rand(cfg.r, in_f, generator=generator, device=dev) * 2 - 1) * math.sqrt(3.0)
        if mode == "random":  # mask 1 + BA with BA of std about 0.3
            return {
                "hira_A": a,
                "hira_B": torch.randn(out_f, cfg.r, generator=generator, device=dev) * 0.3 / math.sqrt(cfg.r),
            }
        a = a / math.sqrt(3.0 * in_f)
        return {"hira_A": a, "hira_B": torch.zeros(out_f, cfg.r, device=dev)}

    def family_config(self, cfg: HiraConfig) -> HutConfig:
        return HutConfig(peft_type="HUT", target_modules=cfg.target_modules, r=cfg.r + 1)

    def family_params(self, cfg, params, weight, bias=None):
        a, b = params["hira_A"], params["hira_B"]
        return {
            "hut_A": torch.cat([b.new_ones(b.shape[0], 1), b], dim=1),  # [out, r+1]
            "hut_B": torch.cat([a.new_ones(1, a.shape[1]), a], dim=0),  # [r+1, in]
        }


register_method(HiraMethod())
