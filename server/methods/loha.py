"""LoHa (PEFT ``peft_type: LOHA``), served exactly as LoRA of rank r² (docs/adapter-format.md).

PEFT stores ``hada_w1_a, hada_w2_a [out, r]`` and ``hada_w1_b, hada_w2_b [r, in]`` per linear:

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   s = alpha / r.

A Hadamard product of two rank-r matrices has rank ≤ r²: with ``(i, j)`` over r × r,
``ΔW = s · Σ_ij (W1a[:, i] ⊙ W2a[:, j]) (W1b[i] ⊙ W2b[j])ᵀ``, i.e. LoRA with
``lora_B[:, (i, j)] = W1a[:, i] ⊙ W2a[:, j]`` and ``lora_A[(i, j)] = W1b[i] ⊙ W2b[j]`` and the same s.
Served on the fly at LoRA rank r²'s cost (``r²·(in + out)`` per token; r ≤ 64).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt

from .base import (
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    Scale,
    StrictNumber,
)
from .converted import ConvertedMethod
from .lora import LoraConfig, LoraMethod
from .registry import register_method

MAX_LOHA_RANK = 64  # r² = 4096, LoRA's largest rank


class LohaConfig(PeftConfig):
    r: StrictInt = Field(8, ge=1, le=MAX_LOHA_RANK)
    alpha: Scale = 8.0
    rank_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    module_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    use_effective_conv2d: StrictBool = False  # convolutions only: no effect on a linear
    init_weights: StrictBool = True  # init only
    peft_version: str | None = None
    rank_pattern: Any = Field(default_factory=dict)
    alpha_pattern: Any = Field(default_factory=dict)


class LohaMethod(ConvertedMethod):
    name: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"
    config_cls: ClassVar[type[MethodConfig]] = LohaConfig
    family: ClassVar[LoraMethod] = LoraMethod()

    def param_specs(self, cfg: LohaConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        r = cfg.r
        return {
            "hada_w1_a": ParamSpec((out_f, r)),
            "hada_w1_b": ParamSpec((r, in_f)),
            "hada_w2_a": ParamSpec((out_f, r)),
            "hada_w2_b": ParamSpec((r, in_f)),
        }

    def init_params(
        self, cfg: LohaConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """PEFT's: W1a, W2a, W1b Kaiming-uniform, W2b = 0 (ΔW = 0); ``random``: all four Gaussian."""
        out_f, in_f = weight.shape
        dev, r = weight.device, cfg.r

        def kaiming(*shape: int) -> torch.Tensor:  # kaiming_uniform_(a=√5): U(±1/√fan_in)
            return (torch.rand(*shape, generator=generator, device=dev) * 2 - 1) / math.sqrt(shape[1])

        if mode == "random":  # s·r·σ⁴ = 0.3·std(W): the update is clearly visible at W's scale
            w_std = weight.float().std().clamp_min(1e-3).item()
            sigma = (0.3 * w_std / (max(abs(cfg.alpha / r), 1e-3) * r)) ** 0.25
            names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
            shapes = ((out_f, r), (r, in_f), (out_f, r), (r, in_f))
            draws = zip(names, shapes, strict=True)
            return {n: sigma * torch.randn(*s, generator=generator, device=dev) for n, s in draws}
        params = {
            "hada_w1_a": kaiming(out_f, r),
            "hada_w1_b": kaiming(r, in_f),
            "hada_w2_a": kaiming(out_f, r),
        }
        return params | {"hada_w2_b": torch.zeros(r, in_f, device=dev)}

    def family_config(self, cfg: LohaConfig) -> LoraConfig:
        # r² and alpha·r give LoRA's scaling alpha / r; built unvalidated (alpha·r may pass LoRA's bound).
        return LoraConfig.model_construct(
            peft_type="LORA", target_modules=cfg.target_modules, r=cfg.r * cfg.r, lora_alpha=cfg.alpha * cfg.r
        )

    def family_params(self, cfg, params, weight, bias=None):
        w1a, w1b, w2a, w2b = (params[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        out_f, in_f = weight.shape
        lora_b = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_f, -1)  # [out, r·r], column (i, j)
        lora_a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, in_f)  # [r·r, in], row (i, j)
        return {"lora_A": lora_a, "lora_B": lora_b}


register_method(LohaMethod())
