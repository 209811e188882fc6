"""VeRA (PEFT ``peft_type: VERA``), served exactly as LoRA (docs/adapter-format.md, PEFT types).

PEFT keeps one pair of frozen random projections for the whole model, ``vera_A [r, max in]`` and
``vera_B [max out, r]`` (stored once, as ``base_model.vera_A`` / ``base_model.vera_B``, when the
config says ``save_projection: true``), and per linear two trained vectors
``λ_b = vera_lambda_b [out]``, ``λ_d = vera_lambda_d [r]``; each linear uses the slices
``A = vera_A[:, :in]``, ``B = vera_B[:out, :]``:

    Δy = λ_b ⊙ (B (λ_d ⊙ (A x)))   =   LoRA with  lora_A = diag(λ_d) A,  lora_B = diag(λ_b) B,  s = 1.

Folders saved without the projections (``save_projection: false``) are refused: PEFT regenerates
them from ``projection_prng_key`` with its own generator calls, which Facet does not replay. Served
on the fly at LoRA's cost (rank r); VeRA adapters are uploaded, not trained here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt, field_validator

from .base import (
    MAX_RANK,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    StrictNumber,
    refuse,
)
from .converted import ConvertedMethod
from .lora import LoraConfig, LoraMethod
from .registry import register_method

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


class VeraConfig(PeftConfig):
    r: StrictInt = Field(256, ge=1, le=MAX_RANK)
    save_projection: StrictBool = True
    projection_prng_key: StrictInt = 0  # only regenerates the projections, which must be saved
    vera_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    d_initial: StrictNumber = 0.1  # init only
    init_weights: StrictBool = True  # init only
    peft_version: str | None = None

    @field_validator("save_projection")
    @classmethod
    def _projection_saved(cls, v: bool) -> bool:
        if not v:
            raise refuse(
                "save_projection=false is not supported: the shared projections must be in the file "
                "(save the adapter with PEFT's VeraConfig(save_projection=True))"
            )
        return v


class VeraMethod(ConvertedMethod):
    name: ClassVar[str] = "vera"
    peft_type: ClassVar[str] = "VERA"
    config_cls: ClassVar[type[MethodConfig]] = VeraConfig
    family: ClassVar[LoraMethod] = LoraMethod()

    def param_specs(self, cfg: VeraConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {
            "vera_lambda_b": ParamSpec((out_f,)),
            "vera_lambda_d": ParamSpec((cfg.r,)),
            "vera_A": ParamSpec((cfg.r, in_f), trainable=False, shared=True),
            "vera_B": ParamSpec((out_f, cfg.r), trainable=False, shared=True),
        }

    def shared_specs(self, cfg: VeraConfig, targets: Mapping[str, tuple[int, int]]) -> dict[str, ParamSpec]:
        max_out = max(o for o, _ in targets.values())
        max_in = max(i for _, i in targets.values())
        return {
            SHARED_A: ParamSpec((cfg.r, max_in), trainable=False),
            SHARED_B: ParamSpec((max_out, cfg.r), trainable=False),
        }

    def shared_views(self, cfg, shared, module, out_f, in_f) -> dict[str, torch.Tensor]:
        return {"vera_A": shared[SHARED_A][:, :in_f], "vera_B": shared[SHARED_B][:out_f, :]}

    def init_params(
        self, cfg: VeraConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One linear's tensors with its own projections (method-level tests; files share them).

        ``identity``: λ_b = 0 (PEFT's init), λ_d = d_initial; ``random``: both random and non-zero.
        Projections: Kaiming-uniform as PEFT's."""
        if mode == "train":
            raise ConfigError("method", "VeRA adapters are uploaded from PEFT folders, not trained here")
        out_f, in_f = weight.shape
        dev, r = weight.device, cfg.r

        def uniform(*shape: int, fan_in: int) -> torch.Tensor:
            return (torch.rand(*shape, generator=generator, device=dev) * 2 - 1) / fan_in**0.5

        params = {"vera_A": uniform(r, in_f, fan_in=in_f), "vera_B": uniform(out_f, r, fan_in=r)}
        if mode == "random":
            return params | {
                # x3: the projections' product is small (entries ~1/sqrt(3 in r)); a visible update
                "vera_lambda_b": 3.0 * torch.randn(out_f, generator=generator, device=dev),
                "vera_lambda_d": 1.0 + 0.3 * torch.randn(r, generator=generator, device=dev),
            }
        return params | {
            "vera_lambda_b": torch.zeros(out_f, device=dev),
            "vera_lambda_d": torch.full((r,), cfg.d_initial, device=dev),
        }

    def family_config(self, cfg: VeraConfig) -> LoraConfig:
        return LoraConfig(peft_type="LORA", target_modules=cfg.target_modules, r=cfg.r, lora_alpha=cfg.r)

    def family_params(self, cfg, params, weight, bias=None):
        return {
            "lora_A": params["vera_lambda_d"][:, None] * params["vera_A"],  # diag(λ_d) A   [r, in]
            "lora_B": params["vera_lambda_b"][:, None] * params["vera_B"],  # diag(λ_b) B   [out, r]
        }


register_method(VeraMethod())
