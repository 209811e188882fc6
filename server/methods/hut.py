"""HUT: Hadamard Updated Transformation (arXiv 2409.13501), general rank-r reading
(docs/adapter-format.md, HUT).

PyTorch layout: ``W [out, in]``, ``y = x Wᵀ + b``. With ``M_A = hut_A [out, r]``,
``M_B = hut_B [r, in]`` and, if ``use_scale_shift``, ``γ = hut_gamma [out]``, ``β = hut_beta [out]``
(otherwise γ = 1, β = 0):

    W' = W ⊙ (M_A M_B)                    multiplicative mask of rank r
    y  = γ ⊙ (x W'ᵀ) + β + b              the original bias b is NOT scaled by γ

Merged: ``W_m = γ[:, None] · W ⊙ (M_A M_B)``, ``b_m = b + β``. With ``a_k = M_A[:, k]`` and
``b_k = M_B[k, :]``, ``W ⊙ (M_A M_B) = Σ_k diag(a_k) W diag(b_k)``, so on the fly

    y = Σ_k (γ ⊙ a_k) ⊙ ((b_k ⊙ x) Wᵀ) + β + b.

Rank 1 (the literal ``diag(a) W diag(b)`` reading, the default) is a row-wise pre-scale of x by
``b_0`` and a post-scale of the shared base output by ``γ ⊙ a_0`` with β added in the same fused
op (``addcmul``). For r > 1 the k = 0 term is served the same way and terms 1..r-1 are one extra
GEMM over the stacked ``[R·(r-1), in]`` scaled rows (``serving_cost`` is then "gemm": the engine
serves such adapters merged). γ/β are folded into the slot tensors (γ = 1, β = 0 when unused),
so the signature is the rank only: adapters with and without γ/β share a table.

Init (train and identity): ``M_A[:, 0] = 1``, other columns 0; ``M_B[0, :] = 1``, other rows
U(±1/√in) (small, LoRA-A-like); γ = 1, β = 0. The mask is then exactly all ones (W' = W).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, StrictBool, StrictInt

from .base import AdapterMethod, ConfigError, FastOp, InitMode, MethodConfig, ParamSpec, per_row
from .batched import rows_linear
from .registry import register_method


class HutSig(NamedTuple):
    """Slot-table key: adapters of one rank share a table (rank 1 is served on the fly)."""

    family: str
    rank: int


class HutConfig(MethodConfig):
    r: StrictInt = Field(1, ge=1)  # rank of the mask M_A M_B; 1 = the literal diag(a) W diag(b)
    use_scale_shift: StrictBool = False  # per-output γ (scale) and β (shift)

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.r > min(out_f, in_f):
            raise ConfigError(
                "r", f"r={self.r} exceeds min(out_features={out_f}, in_features={in_f}) of {module}"
            )


class HutMethod(AdapterMethod):
    name: ClassVar[str] = "hut"
    peft_type: ClassVar[str] = "HUT"
    config_cls: ClassVar[type[MethodConfig]] = HutConfig

    def param_specs(self, cfg: HutConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        specs = {"hut_A": ParamSpec((out_f, cfg.r)), "hut_B": ParamSpec((cfg.r, in_f))}
        if cfg.use_scale_shift:
            specs |= {"hut_gamma": ParamSpec((out_f,)), "hut_beta": ParamSpec((out_f,))}
        return specs

    def init_params(
        self, cfg: HutConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        dev, r = weight.device, cfg.r

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=dev)

        if mode == "random":  # mask ≈ 1 ± O(0.3): every tensor clearly non-zero, output near W's scale
            m_a = 0.3 * randn(out_f, r)
            m_a[:, 0] += 1.0
            m_b = 0.3 * randn(r, in_f)
            m_b[0] += 1.0
            params = {"hut_A": m_a, "hut_B": m_b}
            if cfg.use_scale_shift:
                params |= {"hut_gamma": 1.0 + 0.2 * randn(out_f), "hut_beta": 0.5 * randn(out_f)}
            return params
        m_a = torch.zeros(out_f, r, device=dev)
        m_a[:, 0] = 1.0
        bound = 1.0 / math.sqrt(in_f)
        m_b = (torch.rand(r, in_f, generator=generator, device=dev) * 2 - 1) * bound
        m_b[0] = 1.0
        params = {"hut_A": m_a, "hut_B": m_b}
        if cfg.use_scale_shift:
            params |= {"hut_gamma": torch.ones(out_f, device=dev), "hut_beta": torch.zeros(out_f, device=dev)}
        return params

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(self, cfg: HutConfig, params, weight, bias):
        m_a, m_b = params["hut_A"], params["hut_B"]
        mask = torch.zeros_like(weight)
        for k in range(cfg.r):  # M_A M_B = Σ_k M_A[:, k] ⊗ M_B[k, :]
            mask += torch.outer(m_a[:, k], m_b[k, :])
        w = weight * mask
        if not cfg.use_scale_shift:
            return w, bias
        w = torch.diag(params["hut_gamma"]) @ w
        beta = params["hut_beta"]
        return w, beta.clone() if bias is None else bias + beta

    def merged_weight(self, cfg: HutConfig, params, weight, bias):
        w = weight * (params["hut_A"] @ params["hut_B"])
        if not cfg.use_scale_shift:
            return w, bias
        beta = params["hut_beta"]
        return w * params["hut_gamma"][:, None], beta.clone() if bias is None else bias + beta

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: HutConfig, out_f: int, in_f: int) -> HutSig:
        return HutSig("hut", cfg.r)

    def serving_cost(self, sig: HutSig) -> Literal["cheap", "gemm"]:
        return "cheap" if sig.rank == 1 else "gemm"

    def hooks(self, sig: HutSig) -> frozenset[str]:
        return frozenset({"pre", "post"} if sig.rank == 1 else {"pre", "post", "delta"})

    def fast_op(self, kernels, sig: HutSig, hook: str, shared) -> FastOp | None:
        if sig.rank != 1:  # rank > 1 is served merged (its on-the-fly form is r base GEMMs)
            return None
        if hook == "pre":
            return lambda z, x, g: kernels.scale_rows_(z, g.rows, g.slots, g.table["pre"])
        if hook == "post":
            return lambda y, x, g: kernels.scale_shift_rows_(y, g.rows, g.slots, g.table["post"])
        return None

    def native_op(self, kernels, sig: HutSig, hook: str, g, shared):
        if hook == "pre":
            return kernels.op_scale_rows(g.rows, g.slots, g.table["pre"])
        return kernels.op_scale_shift_rows(g.rows, g.slots, g.table["post"])

    def prepare(self, cfg: HutConfig, params, weight):
        m_a, m_b = params["hut_A"], params["hut_B"]
        if cfg.use_scale_shift:
            gamma, beta = params["hut_gamma"], params["hut_beta"]
        else:
            gamma, beta = torch.ones_like(m_a[:, 0]), torch.zeros_like(m_a[:, 0])
        ga = gamma[:, None] * m_a  # [out, r], γ folded into every a_k
        out = {
            "pre": m_b[0].to(weight.dtype),  # [in]    b_0
            "post": torch.stack([ga[:, 0], beta]).to(weight.dtype),  # [2, out]  (γ ⊙ a_0, β)
        }
        if cfg.r > 1:
            out["Bk"] = m_b[1:].to(weight.dtype)  # [r-1, in]   b_1..b_{r-1}
            out["Ak"] = ga[:, 1:].T.to(weight.dtype)  # [r-1, out]  γ ⊙ a_1..a_{r-1}
        return out

    def pre(self, sig, x, table, slots):
        return x * per_row(table["pre"], slots)

    def post(self, sig, y, table, slots):
        p = per_row(table["post"], slots)  # [R|1, 2, out]
        return torch.addcmul(p[:, 1], y, p[:, 0])

    def delta(self, sig, x, table, slots, weight):
        bk, ak = per_row(table["Bk"], slots), per_row(table["Ak"], slots)  # [R|1, r-1, in|out]
        rows, in_f = x.shape
        xs = (x.unsqueeze(1) * bk).reshape(-1, in_f)  # [R·(r-1), in]
        ys = rows_linear(xs, weight).view(rows, -1, weight.shape[0])  # [R, r-1, out]
        return (ys * ak).sum(1)


register_method(HutMethod())
