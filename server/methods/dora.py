"""DoRA (PEFT ``peft_type: LORA`` with ``use_dora: true``), docs/adapter-format.md, PEFT types.

PEFT stores LoRA's ``A = lora_A [r, in]``, ``B = lora_B [out, r]`` and a magnitude
``m = lora_magnitude_vector [out]``; with ``s`` LoRA's scaling and ``n = ‖W + s·B A‖`` the norm
of each output row (over the input dim, PEFT's ``get_weight_norm`` for ``nn.Linear``):

    W' = diag(m / n) (W + s·B A),      b' = b        (PEFT: the bias is not rescaled)

On the fly: ``y = c ⊙ (x Wᵀ) + (x Aᵀ)(s·Bᵀ diag(c)) + b`` with ``c = m / n``, computed once when
the adapter is prepared (it reads the base weight, so the store's upload check leaves these
tables to the engine's install check). ``n`` is detached as in PEFT (the paper's section 4.3):
training moves it only through the forward value. Cost per token: LoRA's plus one scale of the
output row.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar, Literal

import torch

from .base import InitMode, MethodConfig, ParamSpec, must_be_off, per_row
from .lora import _OFF, LoraConfig, LoraMethod
from .registry import register_method

_DORA_OFF = {k: v for k, v in _OFF.items() if k != "use_dora"}


class DoraConfig(LoraConfig):
    use_dora: Literal[True] = True

    _off = must_be_off(_DORA_OFF)  # replaces LoRA's check of the same name, which refuses use_dora


def _row_norm(weight: torch.Tensor, cfg: LoraConfig, params: dict) -> torch.Tensor:
    """``‖W + s·B A‖`` of each output row."""
    w = torch.addmm(weight, params["lora_B"], params["lora_A"], alpha=cfg.scaling)
    return torch.linalg.vector_norm(w, dim=1)


class DoraMethod(LoraMethod):
    name: ClassVar[str] = "dora"
    peft_type: ClassVar[str] = "LORA"
    config_cls: ClassVar[type[MethodConfig]] = DoraConfig
    prepare_reads_weight: ClassVar[bool] = True

    @classmethod
    def claims_peft(cls, raw: dict) -> bool:
        return raw.get("use_dora") is True

    def param_specs(self, cfg: DoraConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return super().param_specs(cfg, out_f, in_f) | {"lora_magnitude_vector": ParamSpec((out_f,))}

    def tensor_suffix(self, pname: str) -> str:
        return pname if pname == "lora_magnitude_vector" else super().tensor_suffix(pname)

    def init_params(
        self, cfg: DoraConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """LoRA's factors; ``m = ‖W + s·B A‖`` as PEFT (identity), times 1 ± 0.2 when ``random``."""
        params = super().init_params(cfg, weight, mode, generator)
        m = _row_norm(weight.float(), cfg, params)
        if mode == "random":
            m = m * (1.0 + 0.2 * torch.randn(m.shape, generator=generator, device=m.device))
        return params | {"lora_magnitude_vector": m}

    def reference_weight(self, cfg: DoraConfig, params, weight, bias):
        w, _ = super().reference_weight(cfg, params, weight, bias)  # W + s·B A
        norm = torch.sqrt((w * w).sum(dim=1))
        return torch.diag(params["lora_magnitude_vector"] / norm) @ w, bias

    def merged_weight(self, cfg: DoraConfig, params, weight, bias):
        w = torch.addmm(weight, params["lora_B"], params["lora_A"], alpha=cfg.scaling)
        c = params["lora_magnitude_vector"] / torch.linalg.vector_norm(w, dim=1)
        return w * c[:, None], bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: DoraConfig, out_f: int, in_f: int) -> Hashable:
        return ("dora", cfg.r)

    def serving_cost(self, sig: Hashable) -> Literal["cheap", "gemm"]:
        return "cheap"

    def prepare(self, cfg: DoraConfig, params, weight):
        c = params["lora_magnitude_vector"] / _row_norm(weight, cfg, params).detach()  # [out]
        return {
            "A": params["lora_A"].to(weight.dtype),  # [r, in]
            "Bt": (params["lora_B"].T * (cfg.scaling * c)).to(weight.dtype),  # [r, out], s and c folded
            "scale": c.to(weight.dtype),  # [out]
        }

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"post", "delta"})

    def post(self, sig, y, table, slots):
        return y * per_row(table["scale"], slots)


register_method(DoraMethod())
