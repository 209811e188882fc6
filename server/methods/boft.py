"""BOFT: butterfly orthogonal fine-tuning (PEFT ``peft_type: BOFT``), docs/adapter-format.md.

PEFT stores, per linear, ``boft_R [m, k, bs, bs]`` (m = ``boft_n_butterfly_factor`` factors of k
blocks, full matrices) and ``boft_s [out, 1]``. Each factor i is a block-diagonal orthogonal
``B_i = diag(cayley(A_i1), …, cayley(A_ik))`` with ``cayley(A) = (I − S)(I + S)⁻¹``,
``S = (A − Aᵀ)/2``, conjugated by a fixed butterfly permutation ``P_i``:

    M = M_(m−1) ⋯ M_1 M_0,   M_i = P_i B_i P_iᵀ       (P_0 = I)
    y = s ⊙ ((x M) Wᵀ) + b,   i.e.  W' = diag(s) W Mᵀ,  b' = b   (the bias is not scaled)

``P_i`` (PEFT's ``block_butterfly_perm``): inside every chunk of ``bs·2^i`` inputs, the half-blocks
of ``bs/2`` inputs are reordered evens first, then odds. ``in = k·bs`` from ``boft_block_size`` or
``boft_block_num`` (the other 0); the shape checks PEFT makes are made here, naming the field.

Served on the fly: before the shared GEMM each row goes through M_(m−1) first, M_0 last (per
factor a gather, a block-diagonal matmul and a gather: ``m·in·bs`` multiply-adds per token), and
after it the output is scaled by s (``out``). ``prepare`` stores the ``[m, k, bs, bs]`` blocks and s.
Where that is no cheaper than a dense update (``out·in``), ``serving_cost`` says "gemm": served merged.

PEFT builds butterfly factors only where its CUDA extension compiles; elsewhere it silently uses
one factor, and its ``boft_R`` then has a leading 1 whatever the config says. Such a file does not
match its config (m > 1) and is refused by its tensor's shape: PEFT itself computes it differently
on different machines. ``boft_dropout`` acts in training only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import lru_cache
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, StrictBool, StrictInt, field_validator

from .base import (
    AdapterMethod,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    StrictNumber,
    per_row,
    refuse,
)
from .oft import cayley, rotate_rows
from .registry import register_method

MAX_FACTORS = 16  # 2^15 blocks: beyond any linear


class BoftSig(NamedTuple):
    """Slot-table key: the butterfly's shape (its permutations follow from it)."""

    family: str
    out_features: int
    in_features: int
    blocks: int
    block_size: int
    factors: int


class BoftConfig(PeftConfig):
    boft_block_size: StrictInt = Field(4, ge=0)
    boft_block_num: StrictInt = Field(0, ge=0)
    boft_n_butterfly_factor: StrictInt = Field(1, ge=1, le=MAX_FACTORS)
    boft_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    init_weights: StrictBool = True  # init only
    peft_version: str | None = None  # BOFT's layout and math are the same in every PEFT release

    @field_validator("boft_block_num")
    @classmethod
    def _one_of_size_and_num(cls, v: int, info) -> int:
        size = info.data.get("boft_block_size")
        if size is not None and (size != 0) == (v != 0):
            raise refuse(f"exactly one of boft_block_size ({size}) and boft_block_num ({v}) must be non-zero")
        return v

    def blocks(self, in_f: int) -> tuple[int, int]:
        """(k, bs): blocks per factor and their size (unchecked; ``check_shape`` checks)."""
        if self.boft_block_size:
            return in_f // self.boft_block_size, self.boft_block_size
        return self.boft_block_num, in_f // self.boft_block_num

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        """PEFT's checks (``BOFTLayer.update_layer``), each refused naming the field."""
        extra = self.boft_n_butterfly_factor - 1  # the paper's count: factors beyond the first
        where = f"on {module} (in_features={in_f})"
        if self.boft_block_size:
            bs = self.boft_block_size
            if in_f % bs:
                raise ConfigError("boft_block_size", f"{bs} does not divide in_features {where}")
            if extra and in_f % (bs * 2**extra):
                raise ConfigError(
                    "boft_n_butterfly_factor",
                    f"{extra + 1} factors of block size {bs} need a multiple of {bs << extra} {where}",
                )
        else:
            k = self.boft_block_num
            if in_f % k:
                raise ConfigError("boft_block_num", f"{k} does not divide in_features {where}")
            if extra and (extra > int(math.log2(k)) or k % 2**extra):
                raise ConfigError(
                    "boft_n_butterfly_factor",
                    f"{extra + 1} factors need boft_block_num ({k}) a multiple of {2**extra}",
                )
        k, bs = self.blocks(in_f)
        if extra and (k % 2 or bs % 2):
            field = "boft_block_size" if self.boft_block_size else "boft_block_num"
            raise ConfigError(
                field, f"butterfly factors need an even block count and size, got {k} x {bs} {where}"
            )


@lru_cache(maxsize=256)
def butterfly_perms(in_f: int, bs: int, m: int) -> tuple[tuple[int, ...] | None, ...]:
    """``perm_i`` with ``P_i[j, perm_i[j]] = 1`` for each factor (None for the identity, P_0)."""
    out: list[tuple[int, ...] | None] = [None]
    half = bs // 2
    for i in range(1, m):
        chunk = bs * 2**i
        parts = chunk // half  # half-blocks per chunk: evens first, then odds
        order = [*range(0, parts, 2), *range(1, parts, 2)]
        within = [p * half + e for p in order for e in range(half)]
        out.append(tuple(c + w for c in range(0, in_f, chunk) for w in within))
    return tuple(out)


@lru_cache(maxsize=256)
def _gathers(
    in_f: int, bs: int, m: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
    """Per factor, the two gathers of ``x ↦ x P B Pᵀ``: ``x P = x[:, inv]``, ``z Pᵀ = z[:, perm]``."""
    # Built outside inference mode whatever the first caller's mode: the cache outlives it, and an
    # inference tensor used as an index under autograd (a fine-tune after serving) is refused.
    with torch.inference_mode(False):
        return _build_gathers(in_f, bs, m, device)


def _build_gathers(
    in_f: int, bs: int, m: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
    out = []
    for perm in butterfly_perms(in_f, bs, m):
        if perm is None:
            out.append(None)
            continue
        p = torch.tensor(perm, dtype=torch.long)
        out.append((torch.argsort(p).to(device), p.to(device)))
    return tuple(out)


def butterfly_blocks(cfg: BoftConfig, boft_r: torch.Tensor) -> torch.Tensor:
    """``cayley`` of every stored block, ``[m, k, bs, bs]`` (PEFT: the skew part of each, solved)."""
    m, k, bs, _ = boft_r.shape
    a = boft_r.reshape(m * k, bs, bs)
    return cayley(0.5 * (a - a.transpose(1, 2))).reshape(m, k, bs, bs)


def butterfly_rows(x: torch.Tensor, blocks: torch.Tensor, gathers) -> torch.Tensor:
    """``x M`` for rows ``x [R, in]``; ``blocks [R|1, m, k, bs, bs]``: M_(m−1) first, M_0 last."""
    for i in range(blocks.shape[1] - 1, -1, -1):
        g = gathers[i]
        if g is not None:
            x = x[:, g[0]]
        x = rotate_rows(x, blocks[:, i])
        if g is not None:
            x = x[:, g[1]]
    return x


class BoftMethod(AdapterMethod):
    name: ClassVar[str] = "boft"
    peft_type: ClassVar[str] = "BOFT"
    config_cls: ClassVar[type[MethodConfig]] = BoftConfig

    def param_specs(self, cfg: BoftConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        k, bs = cfg.blocks(in_f)
        return {
            "boft_R": ParamSpec((cfg.boft_n_butterfly_factor, k, bs, bs)),
            "boft_s": ParamSpec((out_f, 1)),
        }

    def init_params(
        self, cfg: BoftConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """PEFT's ``init_weights=True``: R = 0 (M = I), s = 1; ``random``: R ~ N(0, 0.2²), s ~ N(1, 0.1²)."""
        specs = self.param_specs(cfg, *weight.shape)
        dev = weight.device
        if mode != "random":
            return {
                "boft_R": torch.zeros(specs["boft_R"].shape, device=dev),
                "boft_s": torch.ones(weight.shape[0], 1, device=dev),
            }
        r = 0.2 * torch.randn(specs["boft_R"].shape, generator=generator, device=dev)
        s = 1.0 + 0.1 * torch.randn(weight.shape[0], 1, generator=generator, device=dev)
        return {"boft_R": r, "boft_s": s}

    def reference_weight(self, cfg: BoftConfig, params, weight, bias):
        """Dense, as PEFT writes it: permutation matrices, explicit inverses, ``diag(s) W Mᵀ``."""
        in_f = weight.shape[1]
        r = params["boft_R"]
        m, k, bs, _ = r.shape
        eye_b = torch.eye(bs, dtype=r.dtype, device=r.device)
        eye = torch.eye(in_f, dtype=r.dtype, device=r.device)
        total = eye
        for i, perm in enumerate(butterfly_perms(in_f, bs, m)):
            p = eye if perm is None else eye[list(perm)]  # P[j, perm[j]] = 1
            blocks = []
            for a in r[i]:
                s = 0.5 * (a - a.T)
                blocks.append((eye_b - s) @ torch.linalg.inv(eye_b + s))
            total = (p @ torch.block_diag(*blocks) @ p.T) @ total
        return params["boft_s"] * (weight @ total.T), bias

    def merged_weight(self, cfg: BoftConfig, params, weight, bias):
        """``diag(s) W Mᵀ``, with ``M = I M`` built by the serving path from the identity's rows."""
        in_f = weight.shape[1]
        blocks = butterfly_blocks(cfg, params["boft_R"]).unsqueeze(0)
        eye = torch.eye(in_f, dtype=weight.dtype, device=weight.device)
        m_full = butterfly_rows(eye, blocks, _gathers(in_f, blocks.shape[-1], blocks.shape[1], weight.device))
        return params["boft_s"] * (weight @ m_full.T), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: BoftConfig, out_f: int, in_f: int) -> Hashable:
        return BoftSig("boft", out_f, in_f, *cfg.blocks(in_f), cfg.boft_n_butterfly_factor)

    def serving_cost(self, sig: BoftSig) -> Literal["cheap", "gemm"]:
        """On the fly costs ``m·in·bs + out`` per token: merged from a dense update's ``out·in`` on."""
        on_the_fly = sig.factors * sig.in_features * sig.block_size + sig.out_features
        return "gemm" if on_the_fly >= sig.out_features * sig.in_features else "cheap"

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"pre", "post"})

    def prepare(self, cfg: BoftConfig, params, weight):
        blocks = butterfly_blocks(cfg, params["boft_R"])
        return {"B": blocks.to(weight.dtype), "s": params["boft_s"][:, 0].to(weight.dtype)}

    def pre(self, sig, x, table, slots):
        gathers = _gathers(sig.in_features, sig.block_size, sig.factors, x.device)
        return butterfly_rows(x, per_row(table["B"], slots), gathers)

    def post(self, sig, y, table, slots):
        return y * per_row(table["s"], slots)


register_method(BoftMethod())
