"""ETHER and ETHER+: block-diagonal hyperplane reflections of a frozen linear (arXiv 2405.20271).

PyTorch layout: ``W [out, in]``, ``y = x Wᵀ + b``. On a chosen side of dimension ``D`` (``in`` or
``out``), with ``n = n_blocks`` blocks of size ``b = D / n`` and raw (unnormalised, as trained) vectors
``u, v [n, b]`` normalised per block (``û_k = u_k / ‖u_k‖``)::

    ETHER   H  = blockdiag_k(I_b − 2 û_k û_kᵀ)              orthogonal, symmetric, H² = I, never I
    ETHER+  H⁺ = blockdiag_k(I_b − û_k û_kᵀ + v̂_k v̂_kᵀ)     symmetric; equals I when v = −u

    W' = H_out · W · H_in        (only the chosen side(s); the bias is never transformed)

Since H is symmetric, the input side is ``y = (x H_in) Wᵀ + b``: a ``pre`` transform of each
activation row; the output side is ``y = (x Wᵀ) H_out + b``: a ``post`` transform of each bias-free
base-output row. Both act block by block on a row ``z`` (``z_k`` = its k-th length-b chunk)::

    ETHER:  z_k ← z_k − 2 û (û · z_k)                            table û [n, b]
    ETHER+: z_k ← z_k − ½ p1 (p0 · z_k) − ½ p0 (p1 · z_k)         table (p0, p1) [2, n, b]
            with p0 = û − v̂, p1 = û + v̂, since −½(p1 p0ᵀ + p0 p1ᵀ) = −ûûᵀ + v̂v̂ᵀ

one gather, one product, one sum and one (ETHER) or two (ETHER+) fused multiply-adds per group,
with the slot table gathered per row. At the ETHER+ init ``v = −u`` the vector ``p1 = û + v̂``
is exactly zero, so the output is ``z`` bit for bit. Signature = (variant, sides, n_blocks,
shape): ETHER and ETHER+ have different tables (ETHER needs half the work), so a batch mixing
them, or block counts, or sides, runs one group per signature. The merge applies the same
transform to the rows of ``W`` (input side) and of ``Wᵀ`` (output side): one or two rank-1
updates per block, O(out·in) per side, H never materialised; ``reference_weight`` instead builds
the dense ``torch.block_diag`` matrices and multiplies (the test oracle).

Config: ``variant`` "ether" | "etherplus"; ``side`` "in" | "out" | "both" (ETHER+ only: two-sided,
the official code's recommended ``etherplusHH``) | "auto" (the smaller dimension, ties -> "in");
``n_blocks`` must divide the chosen side's dimension of every targeted module. Defaults:
``etherplus`` (the better-performing variant per the README, and the only one with an identity
init, which the training stack expects), ``auto`` (the one-sided default is the smaller
dimension, as the official README advises; docs/adapter-format.md), ``n_blocks=1`` (the official
finetune default; it divides every dimension, and the parameter count and on-the-fly cost do not
depend on n).

Tensors per targeted linear (float): ``ether_u_<side> [n_blocks, D/n_blocks]`` and, for ETHER+,
``ether_v_<side>`` of the same shape, for each side in use. Init: ETHER ``train``/``random`` draws
``u`` Kaiming-uniform(a=√5), i.e. U(±1/√b); ETHER has no identity (a reflection is never I).
ETHER+ ``identity``/``train``: ``u`` as above and ``v = −u`` (H⁺ = I exactly); ``random``: ``v``
drawn independently (a non-identity H⁺).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Annotated, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator

from .adapter import KEY_PREFIX
from .base import (
    AdapterMethod,
    ConfigError,
    FastOp,
    InitMode,
    MethodConfig,
    ParamSpec,
    WeightsError,
    per_row,
)
from .registry import register_method

Side = Literal["in", "out"]


class EtherSig(NamedTuple):
    """Slot-table key: variant, the sides transformed (resolved for the shape), blocks, shape."""

    variant: str
    sides: tuple[Side, ...]
    n_blocks: int
    out_f: int
    in_f: int


# Smallest accepted RMS entry of a raw u/v block, i.e. ||u|| >= MIN_RMS·√b. ``prepare`` computes
# u/max(||u||, 1e-12) in float32: the norm must be far above that clamp, and the squares summed
# into ||u||² must stay in float32's normal range (>= 1.2e-38) to keep their relative precision.
# At RMS 1e-6 a typical square is 1e-12, 26 decades above the underflow, and ||u|| >= 1.4e-6, six
# decades above the clamp (a norm of 1e-13 was accepted before and gave a non-orthogonal block).
# Trained vectors are far larger: the init has RMS 1/√(3b), 0.02-0.06 at SmolLM2 sizes.
MIN_RMS = 1e-6


class EtherConfig(MethodConfig):
    variant: Literal["ether", "etherplus"] = "etherplus"
    side: Literal["in", "out", "both", "auto"] = "auto"
    n_blocks: Annotated[int, Field(strict=True, ge=1)] = 1

    @field_validator("side")
    @classmethod
    def _both_needs_etherplus(cls, side: str, info: ValidationInfo) -> str:
        if side == "both" and info.data.get("variant") == "ether":
            raise ValueError(
                "side='both' (two-sided) is only defined for variant='etherplus'; "
                "plain ETHER is one-sided: use side 'in', 'out' or 'auto'"
            )
        return side

    def sides(self, out_f: int, in_f: int) -> tuple[Side, ...]:
        """The side(s) this config transforms on a ``[out_f, in_f]`` linear."""
        if self.side == "both":
            return ("in", "out")
        if self.side == "auto":
            return ("in",) if in_f <= out_f else ("out",)
        return (self.side,)

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        dims = {"in": ("in_features", in_f), "out": ("out_features", out_f)}
        for s in self.sides(out_f, in_f):
            label, d = dims[s]
            if d % self.n_blocks:
                raise ConfigError(
                    "n_blocks", f"n_blocks={self.n_blocks} does not divide {label}={d} of {module}"
                )
            if d // self.n_blocks < 2:
                raise ConfigError(
                    "n_blocks",
                    f"n_blocks={self.n_blocks} gives blocks of size 1 on {label}={d} of {module}: a 1-D "
                    "reflection is a fixed sign flip and a 1-D ETHER+ block is always the identity "
                    "(nothing to learn); use fewer blocks",
                )


def _param_names(cfg: EtherConfig, side: Side) -> tuple[str, ...]:
    return (f"ether_u_{side}", f"ether_v_{side}") if cfg.variant == "etherplus" else (f"ether_u_{side}",)


def _side_dim(side: Side, out_f: int, in_f: int) -> int:
    return in_f if side == "in" else out_f


def _transform(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Rows of ``z [R, D]`` through the blocks of the gathered per-row table ``p``.

    ETHER: ``p = û [R or 1, n, b]``, ``z_k - 2 û (û · z_k)``. ETHER+: ``p = (p0, p1) [R or 1, 2, n, b]``,
    ``z_k - ½ p1 (p0 · z_k) - ½ p0 (p1 · z_k)``.
    """
    r, d = z.shape
    n, b = p.shape[-2], p.shape[-1]
    if p.dtype != z.dtype:
        p = p.to(z.dtype)
    if p.dim() == 3:  # ETHER
        z3 = z.reshape(r, n, b)  # one length-b chunk per block
        s = (z3 * p).sum(-1, keepdim=True)  # [R, n, 1]: û · z_k
        return torch.addcmul(z3, s, p, value=-2.0).view(r, d)
    z4 = z.reshape(r, 1, n, b)
    s0, s1 = (z4 * p).sum(-1, keepdim=True).unbind(1)  # [R, n, 1] each: p0 · z_k, p1 · z_k
    p0, p1 = p.unbind(1)  # [R or 1, n, b]
    return torch.addcmul(z4.select(1, 0), s0, p1, value=-0.5).addcmul_(s1, p0, value=-0.5).view(r, d)


class EtherMethod(AdapterMethod):
    name: ClassVar[str] = "ether"
    peft_type: ClassVar[str] = "ETHER"
    config_cls: ClassVar[type[MethodConfig]] = EtherConfig

    def param_specs(self, cfg: EtherConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        specs = {}
        for side in cfg.sides(out_f, in_f):
            shape = (cfg.n_blocks, _side_dim(side, out_f, in_f) // cfg.n_blocks)
            for pname in _param_names(cfg, side):
                specs[pname] = ParamSpec(shape)
        return specs

    def check_params(
        self, cfg: EtherConfig, module: str, params: dict[str, torch.Tensor], out_f: int, in_f: int
    ) -> None:
        for pname, t in sorted(params.items()):
            where = f"{KEY_PREFIX}{module}.{pname}"
            norms = t.float().norm(dim=-1)  # [n_blocks], in float32 as ``prepare`` normalises
            if not (norms > 0).all():
                k = int((norms <= 0).nonzero()[0, 0])
                raise WeightsError(where, f"block {k} is an all-zero vector (cannot be normalised)")
            floor = MIN_RMS * math.sqrt(t.shape[-1])
            small = ~(norms >= floor) | ~torch.isfinite(norms)
            if small.any():
                k = int(small.nonzero()[0, 0])
                raise WeightsError(
                    where,
                    f"block {k} has norm {float(norms[k]):.3g}, outside [{floor:.3g}, inf) in float32 "
                    f"(RMS entry >= {MIN_RMS:g}): its normalisation would not give a unit vector, so "
                    "the block would not be a reflection",
                )

    # ---- initialisation ------------------------------------------------------------------
    def init_params(
        self, cfg: EtherConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        if mode == "identity" and cfg.variant == "ether":
            raise ConfigError(
                "variant",
                "plain ETHER has no identity initialisation: every block is a Householder reflection "
                "I - 2uuᵀ, which is never the identity (‖H_k - I‖_F = 2 for any u, by design); use "
                "variant='etherplus', whose init v = -u gives exactly H⁺ = I",
            )
        out_f, in_f = weight.shape

        def kaiming(shape: tuple[int, int]) -> torch.Tensor:
            # kaiming_uniform_(a=sqrt(5)) on [n, b]: fan_in = b, bound = 1/sqrt(b)
            t = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
            return ((t * 2 - 1) / math.sqrt(shape[1])).to(weight.device)

        params = {}
        for side in cfg.sides(out_f, in_f):
            shape = (cfg.n_blocks, _side_dim(side, out_f, in_f) // cfg.n_blocks)
            u = kaiming(shape)
            params[f"ether_u_{side}"] = u
            if cfg.variant == "etherplus":
                params[f"ether_v_{side}"] = kaiming(shape) if mode == "random" else -u
        return params

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(
        self,
        cfg: EtherConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = weight.double()
        out_f, in_f = weight.shape
        for side in cfg.sides(out_f, in_f):
            u = params[f"ether_u_{side}"].double()
            v = params[f"ether_v_{side}"].double() if cfg.variant == "etherplus" else None
            blocks = []
            for k in range(cfg.n_blocks):
                uk = u[k] / torch.linalg.vector_norm(u[k])
                eye = torch.eye(uk.numel(), dtype=torch.float64, device=w.device)
                if v is None:
                    blocks.append(eye - 2 * torch.outer(uk, uk))
                else:
                    vk = v[k] / torch.linalg.vector_norm(v[k])
                    blocks.append(eye - torch.outer(uk, uk) + torch.outer(vk, vk))
            h = torch.block_diag(*blocks)  # [D, D]
            w = w @ h if side == "in" else h @ w
        return w.to(weight.dtype), bias

    def merged_weight(
        self,
        cfg: EtherConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        table = self.prepare(cfg, params, weight)
        w = weight
        if "in" in table:  # W H_in: every row of W (length in) through H_in
            w = _transform(w, table["in"].unsqueeze(0))
        if "out" in table:  # H_out W = (Wᵀ H_out)ᵀ: every column of W through H_out
            w = _transform(w.T.contiguous(), table["out"].unsqueeze(0)).T.contiguous()
        return w, bias

    # ---- batched on-the-fly path ---------------------------------------------------------
    def signature(self, cfg: EtherConfig, out_f: int, in_f: int) -> EtherSig:
        return EtherSig(cfg.variant, cfg.sides(out_f, in_f), cfg.n_blocks, out_f, in_f)

    def prepare(
        self, cfg: EtherConfig, params: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        table = {}
        for side in cfg.sides(out_f, in_f):
            u = F.normalize(params[f"ether_u_{side}"].float(), dim=-1)  # [n, b]
            if cfg.variant == "etherplus":  # −ûûᵀ + v̂v̂ᵀ = −½(a dᵀ + d aᵀ), d = û − v̂, a = û + v̂
                v = F.normalize(params[f"ether_v_{side}"].float(), dim=-1)
                table[side] = torch.stack([u - v, u + v])  # [2, n, b]
            else:
                table[side] = u
        return table

    def hooks(self, sig: EtherSig) -> frozenset[str]:
        sides = sig.sides
        return frozenset(({"pre"} if "in" in sides else set()) | ({"post"} if "out" in sides else set()))

    def fast_op(self, kernels, sig: EtherSig, hook: str, shared) -> FastOp | None:
        side = {"pre": "in", "post": "out"}.get(hook)
        if side not in sig.sides:
            return None
        return lambda z, x, g: kernels.reflect_rows_(z, g.rows, g.slots, g.table[side])

    def native_op(self, kernels, sig: EtherSig, hook: str, g, shared):
        return kernels.op_reflect_rows(g.rows, g.slots, g.table["in" if hook == "pre" else "out"])

    def pre(self, sig: Hashable, x: torch.Tensor, table: dict, slots: torch.Tensor | None):
        return _transform(x, per_row(table["in"], slots)) if "in" in table else None

    def post(self, sig: Hashable, y: torch.Tensor, table: dict, slots: torch.Tensor | None):
        return _transform(y, per_row(table["out"], slots)) if "out" in table else None


register_method(EtherMethod())
