"""OFT: orthogonal fine-tuning (PEFT ``peft_type: OFT``, PEFT >= 0.16's layout), docs/adapter-format.md.

PEFT stores ``oft_R.weight [n, bs·(bs−1)/2]`` per linear: for each of ``n`` blocks the strict upper
triangle of a skew-symmetric ``Q_b [bs, bs]`` (``Q = U − Uᵀ``). Each block becomes an orthogonal
``R_b``, and the input is rotated block by block before the base GEMM:

    y = (x R) Wᵀ + b,   R = diag(R_1, …, R_k)  [in, in],   i.e.  W' = W Rᵀ,  b' = b
    Cayley (use_cayley_neumann false):  R_b = (I − Q_b)(I + Q_b)⁻¹
    Cayley–Neumann (true, t terms):     R_b = I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)  (PEFT ≥ 0.18's
                                        series; t = 3 gives I + 2Q + 2Q² + Q³, t = 2 I + 2Q, t ≤ 1 I)

``in = k·bs`` with ``k = r`` or ``bs = oft_block_size`` (the other one 0), both adjusted to a
divisor of ``in`` exactly as PEFT adjusts them; ``block_share`` stores one block used k times
(``n = 1``); ``coft`` first clips each skew block to Frobenius norm ``eps / √n`` (PEFT projects
its parameter in place on every forward; the projection is idempotent, so clipping the stored
values once computes the same). ``module_dropout`` acts in training only.

Served on the fly: a block-diagonal ``x R`` per row before the shared GEMM, ``in·bs``
multiply-adds per token; ``prepare`` stores the k blocks ``R_b`` as ``[k, bs, bs]``. Where that is
no cheaper than a dense update (``bs >= out``), ``serving_cost`` says "gemm": served merged.

Versions: PEFT < 0.14 had no ``oft_block_size`` (refused, as PEFT refuses it); 0.14–0.15 stored
``oft_r``/``oft_s`` (full blocks and a scale: not this layout, refused by its tensor names);
0.16–0.17 are this layout with an older Cayley–Neumann series; ``peft_version`` is written from 0.18
on. So Cayley–Neumann needs ``peft_version >= 0.18``; exact Cayley is served from 0.16 on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
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
from .registry import register_method

MAX_NEUMANN_TERMS = 64  # PEFT's default is 5; each term is a block matmul when preparing
NEUMANN_SINCE = (0, 18, 0)  # PEFT 0.18 changed the Cayley–Neumann series (its last term)
LAYOUT_SINCE = (0, 16, 0)  # oft_R.weight, the packed upper triangles


def peft_before(version: str, release: tuple[int, int, int]) -> bool | None:
    """Whether a PEFT version string ("0.21.2", "0.18.0.dev0", "0.19.0@abc123") is older than
    ``release``, a pre-release of it counting as older (as PEFT's own check compares); None when
    ``version`` is not a version number."""
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?([^@]*)(@.*)?", version)
    if m is None:
        return None
    found = (int(m[1]), int(m[2]), int(m[3] or 0))
    return found < release or (found == release and m[4] != "")


class OftSig(NamedTuple):
    """Slot-table key: adapters with the same blocks share a table (shared or not, Cayley or the
    series: every table is the k blocks ``[k, bs, bs]``)."""

    family: str
    out_features: int
    blocks: int
    block_size: int


class OftConfig(PeftConfig):
    r: StrictInt = Field(0, ge=0)
    # None: the field is absent, i.e. PEFT < 0.14's layout (validated, to say so by name)
    oft_block_size: StrictInt | None = Field(None, ge=0, validate_default=True)
    module_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)  # training only
    coft: StrictBool = False
    eps: StrictNumber = Field(6e-5, ge=0.0)
    block_share: StrictBool = False
    use_cayley_neumann: StrictBool = True
    num_cayley_neumann_terms: StrictInt = Field(5, ge=0, le=MAX_NEUMANN_TERMS)
    init_weights: StrictBool = True  # init only
    # validated after use_cayley_neumann (declared after it): the series depends on the version
    peft_version: str | None = Field(None, validate_default=True)

    @field_validator("oft_block_size")
    @classmethod
    def _one_of_r_and_block_size(cls, v: int | None, info) -> int | None:
        if v is None:
            raise refuse(
                "oft_block_size is missing: an OFT config of PEFT < 0.14 (an older layout, refused by "
                "PEFT itself); OFT adapters of PEFT >= 0.16 are supported"
            )
        r = info.data.get("r")
        if r is not None and (r != 0) == (v != 0):
            raise refuse(f"exactly one of r ({r}) and oft_block_size ({v}) must be non-zero (PEFT's rule)")
        return v

    @field_validator("peft_version")
    @classmethod
    def _version_has_this_layout(cls, v: str | None, info) -> str | None:
        old_layout = None if v is None else peft_before(v, LAYOUT_SINCE)
        if v is not None and old_layout is None:
            raise refuse(f"peft_version={v!r} is not a version number")
        if old_layout:
            raise refuse(
                f"peft_version={v!r}: OFT is served for PEFT >= 0.16 (oft_R.weight); older layouts differ"
            )
        if info.data.get("use_cayley_neumann") and (v is None or peft_before(v, NEUMANN_SINCE)):
            raise refuse(
                f"peft_version={v!r}: use_cayley_neumann adapters are served for peft_version >= 0.18.0 "
                "(PEFT 0.18 changed the series; older ones are not told apart); exact Cayley from 0.16"
            )
        return v

    def blocks(self, in_f: int) -> tuple[int, int]:
        """(k, bs): the number of blocks and their size on an ``in_f`` input, as PEFT adjusts them."""
        if self.r == 0:
            bs = self.oft_block_size
            if in_f % bs != 0 or bs > in_f:
                bs = adjust_to_divisor(in_f, bs)
            return in_f // bs, bs
        k = self.r
        if in_f % k != 0 or k > in_f:
            k = adjust_to_divisor(in_f, k)
        return k, in_f // k

    def stored_blocks(self, in_f: int) -> int:
        return 1 if self.block_share else self.blocks(in_f)[0]

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.blocks(in_f)[1] < 2:
            field = "r" if self.r else "oft_block_size"
            raise ConfigError(field, f"a block size of 1 on {module} (in_features={in_f}) rotates nothing")


def adjust_to_divisor(n: int, p: int) -> int:
    """PEFT's fallback for a block count or size that does not divide ``n``: the nearest divisor,
    the lower one on a tie (``n`` itself when ``p >= n``)."""
    if p >= n:
        return n
    higher = p
    while higher <= n and n % higher != 0:
        higher += 1
    lower = p
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if p - lower <= higher - p else higher


# ---- the rotation blocks, shared with BOFT ------------------------------------------------------
def skew_from_packed(vec: torch.Tensor, bs: int) -> torch.Tensor:
    """``[n, bs·(bs−1)/2]`` strict upper triangles (row-major, PEFT's order) -> ``U − Uᵀ [n, bs, bs]``."""
    rows, cols = torch.triu_indices(bs, bs, 1, device=vec.device)
    u = vec.new_zeros(vec.shape[0], bs, bs)
    u[:, rows, cols] = vec
    return u - u.transpose(1, 2)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I − Q)(I + Q)⁻¹`` per block, as PEFT solves it (``X (I + Q) = I − Q``)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT 0.18's truncated series for the Cayley transform, term by term in its order."""
    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            r = r + power @ q
    return r


def coft_projection(vec: torch.Tensor, bs: int, eps: float) -> torch.Tensor:
    """COFT: each skew block clipped to Frobenius norm ``eps / √n`` (``n`` stored blocks)."""
    skew = skew_from_packed(vec, bs)
    bound = eps / math.sqrt(vec.shape[0])
    norm = torch.linalg.matrix_norm(skew, keepdim=True)
    clipped = torch.where(norm <= bound, skew, bound * (skew / norm))
    rows, cols = torch.triu_indices(bs, bs, 1, device=vec.device)
    return clipped[:, rows, cols]


def rotation_blocks(cfg: OftConfig, packed: torch.Tensor, in_f: int) -> torch.Tensor:
    """The k orthogonal blocks ``R_b [k, bs, bs]`` PEFT applies (the shared one repeated)."""
    k, bs = cfg.blocks(in_f)
    vec = packed
    if cfg.coft:  # PEFT overwrites its parameter (no_grad): the gradient is taken at the clipped point
        vec = packed + (coft_projection(packed.detach(), bs, cfg.eps) - packed).detach()
    q = skew_from_packed(vec, bs)
    r = cayley_neumann(q, cfg.num_cayley_neumann_terms) if cfg.use_cayley_neumann else cayley(q)
    return r.expand(k, bs, bs) if cfg.block_share else r


def rotate_rows(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x R`` for rows ``x [R, in]`` and per-row (or one broadcast) blocks ``[R|1, k, bs, bs]``."""
    k, bs = blocks.shape[-3], blocks.shape[-1]
    return torch.matmul(x.reshape(-1, k, 1, bs), blocks).reshape(x.shape)


class OftMethod(AdapterMethod):
    name: ClassVar[str] = "oft"
    peft_type: ClassVar[str] = "OFT"
    config_cls: ClassVar[type[MethodConfig]] = OftConfig

    def param_specs(self, cfg: OftConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        bs = cfg.blocks(in_f)[1]
        return {"oft_R": ParamSpec((cfg.stored_blocks(in_f), bs * (bs - 1) // 2))}

    def tensor_suffix(self, pname: str) -> str:
        return f"{pname}.weight"  # PEFT: oft_R.weight (an OFTRotationModule's parameter)

    def init_params(
        self, cfg: OftConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """PEFT's ``init_weights=True``: zeros (R = I exactly); ``random``: Gaussian, std 0.2."""
        (spec,) = self.param_specs(cfg, *weight.shape).values()
        if mode == "random":
            return {"oft_R": 0.2 * torch.randn(spec.shape, generator=generator, device=weight.device)}
        return {"oft_R": torch.zeros(spec.shape, device=weight.device)}

    def reference_weight(self, cfg: OftConfig, params, weight, bias):
        """Dense: every block's R from explicit inverses / powers, the block-diagonal R, ``W Rᵀ``."""
        in_f = weight.shape[1]
        k, bs = cfg.blocks(in_f)
        vec = params["oft_R"]
        if cfg.coft:
            vec = coft_projection(vec, bs, cfg.eps)
        q = skew_from_packed(vec, bs)
        eye = torch.eye(bs, dtype=q.dtype, device=q.device)
        if not cfg.use_cayley_neumann:
            blocks = [(eye - qb) @ torch.linalg.inv(eye + qb) for qb in q]
        else:
            t = cfg.num_cayley_neumann_terms  # coefficients of Q⁰, Q¹, … (t = 3 and 4 coincide)
            coefs = [1.0] if t <= 1 else [1.0, 2.0] if t == 2 else [1.0] + [2.0] * (max(t, 4) - 2) + [1.0]
            blocks = [sum(c * torch.linalg.matrix_power(qb, i) for i, c in enumerate(coefs)) for qb in q]
        if cfg.block_share:
            blocks = blocks * k
        return weight @ torch.block_diag(*blocks).T, bias

    def merged_weight(self, cfg: OftConfig, params, weight, bias):
        blocks = rotation_blocks(cfg, params["oft_R"], weight.shape[1])  # W Rᵀ, block by block
        out_f, in_f = weight.shape
        k, bs = blocks.shape[0], blocks.shape[-1]
        w = torch.einsum("okc,kdc->okd", weight.reshape(out_f, k, bs), blocks)
        return w.reshape(out_f, in_f), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: OftConfig, out_f: int, in_f: int) -> Hashable:
        return OftSig("oft", out_f, *cfg.blocks(in_f))

    def serving_cost(self, sig: OftSig) -> Literal["cheap", "gemm"]:
        """On the fly costs ``in·bs`` per token; from ``bs >= out`` that is a dense update's ``out·in``
        or more (a few wide blocks on a narrow linear): the engine then serves it merged."""
        return "gemm" if sig.block_size >= sig.out_features else "cheap"

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"pre"})

    def prepare(self, cfg: OftConfig, params, weight):
        blocks = rotation_blocks(cfg, params["oft_R"], weight.shape[1])
        return {"R": blocks.contiguous().to(weight.dtype)}  # [k, bs, bs]

    def pre(self, sig, x, table, slots):
        return rotate_rows(x, per_row(table["R"], slots))


register_method(OftMethod())
