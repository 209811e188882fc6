"""SURM: Structured Unrestricted-Rank Matrices (arXiv 2406.17740) as an additive update.

PyTorch layout: ``W [out, in]``, ``y = x Wᵀ + b``. The adapted layer is ``W' = W + α·ΔW`` with
``ΔW`` one of four structured matrices (``N = max(out, in)``; non-square layers use the
top-left ``[out, in]`` block of the ``N × N`` matrix, docs/adapter-format.md):

* ``circulant``: ``ΔW = circ(c)[:out, :in]``, ``circ(c)[i, j] = c[(i − j) mod N]`` (first
  COLUMN = c), ``c = r1 ⊙ r2`` (``surm_r1``, ``surm_r2`` [N], both trainable).
  On the fly: ``Δy = irfft(rfft(x, n=N) ⊙ rfft(α·c), n=N)[:out]`` (FFT of x shared by all rows,
  only the pointwise product uses the row's slot spectrum).
* ``toeplitz``: ``ΔW = (T(b) T(a))[:out, :in]``, ``T(a)[i, j] = a[|i − j|]`` (symmetric
  Toeplitz, ``surm_a``, ``surm_b`` [N]). On the fly: each ``T(v)`` is the top-left block of a
  circulant of length ``L ≥ 2N − 1`` whose first column is ``[v0..v_{N−1}, 0.., v_{N−1}..v1]``;
  that column is symmetric, so its spectrum is real. Two FFT products, truncated to N between.
* ``kronecker``: ``ΔW = B ⊗ A`` (``torch.kron``), ``A = surm_kron_A [f, in/f]``,
  ``B = surm_kron_B [out/f, f]``, ``f = kron_factor`` dividing in and out. On the fly, with
  ``X = x.view(f, in/f)``: ``(B ⊗ A) x = (B X Aᵀ).reshape(out)`` (row ``p·f + r`` of ΔW is
  ``B[p, :] ⊗ A[r, :]``).
* ``ldr``: the paper's general low-displacement-rank family
  ``ΔW = (Σ_{i<r} Z_1(g_i) Z_{−1}(h_i))[:out, :in]`` (circulant times skew-circulant, r =
  ``ldr_rank``; ``surm_g``, ``surm_h`` [r, N]). On the fly by FFTs, ``2r + 2`` of length N per row
  (server/methods/_surm_ldr.py, which holds its math).

Init (identity = train, one factor zero): circulant r1 ~ N(0, 0.02), r2 = 0; toeplitz
a ~ N(0, 0.02), b = 0; kronecker A Kaiming-uniform, B = 0; ldr g = 0, h ~ N(0, 0.02) (the
paper's code). The circulant's 0.02 is a choice: the paper's code comments std 0.02 but draws
``torch.randn`` (std 1). Under Adam r2 moves about lr per step whatever r1's scale, so
``c = r1 ⊙ r2`` moves in proportion to r1: std 1 would be a 50x larger effective learning rate
(docs/adapter-format.md). FFTs always run in float32 (bf16
has no FFT); α is folded into the prepared slot tensors, so it is not part of the signature.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import cache
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, StrictInt, ValidationInfo, field_validator

from . import _surm_ldr as ldr
from .base import (
    AdapterMethod,
    ConfigError,
    FastOp,
    InitMode,
    MethodConfig,
    ParamSpec,
    Scale,
    compute_dtype,
    per_row,
)
from .registry import register_method

Variant = Literal["circulant", "toeplitz", "kronecker", "ldr"]

# The Kronecker kernel's rows per group: its per-row products beat the torch code's batched ones
# for a decode step's few rows and lose past about a dozen (bf16, 2 threads, 8 slots, the 4
# SmolLM2 projection shapes summed, µs above the GEMMs: 6 rows 235 against 412, 16 rows 524
# against 452, 256 rows 7,039 against 3,522), so a larger group is served by the torch code
# (``kernel_max_rows``).
KRON_KERNEL_MAX_ROWS = 12


class SurmSig(NamedTuple):
    """Slot-table key: the variant and shape (α is folded into the tables)."""

    variant: Variant
    out_f: int
    in_f: int
    kron_factor: int | None  # kronecker only
    ldr_rank: int | None = None  # ldr only (a default: signatures built before ldr still hold)


class SurmConfig(MethodConfig):
    variant: Variant = "circulant"
    alpha: Scale = 1.0  # |alpha| <= MAX_SCALE
    # f: required for (and only for) the kronecker variant. Validated even when absent, after
    # ``variant`` (fields validate in order), so errors point at ``kron_factor``.
    kron_factor: StrictInt | None = Field(default=None, validate_default=True)
    # r, the displacement rank: required for (and only for) the ldr variant, 1 <= r <= 64 and
    # r <= N of every target (r = N already spans every matrix).
    ldr_rank: StrictInt | None = Field(default=None, validate_default=True)

    @field_validator("kron_factor")
    @classmethod
    def _check_kron_factor(cls, f: int | None, info: ValidationInfo) -> int | None:
        variant = info.data.get("variant")
        if variant == "kronecker":
            if f is None:
                raise ValueError("kron_factor is required for variant='kronecker'")
            if f < 1:
                raise ValueError(f"kron_factor must be >= 1, got {f}")
        elif f is not None:
            raise ValueError(f"kron_factor is only used by variant='kronecker', not {variant!r}")
        return f

    @field_validator("ldr_rank")
    @classmethod
    def _check_ldr_rank(cls, r: int | None, info: ValidationInfo) -> int | None:
        variant = info.data.get("variant")
        if variant == "ldr":
            if r is None:
                raise ValueError("ldr_rank is required for variant='ldr'")
            if not 1 <= r <= ldr.MAX_LDR_RANK:
                raise ValueError(f"ldr_rank must be in [1, {ldr.MAX_LDR_RANK}], got {r}")
        elif r is not None:
            raise ValueError(f"ldr_rank is only used by variant='ldr', not {variant!r}")
        return r

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.variant == "kronecker":
            _kron_dims(self.kron_factor, out_f, in_f, module)
        elif self.variant == "ldr":
            _ldr_dims(self.ldr_rank, out_f, in_f, module)


def _kron_dims(f: int, out_f: int, in_f: int, module: str = "the linear") -> tuple[int, int]:
    for name, dim in (("in_features", in_f), ("out_features", out_f)):
        if dim % f:
            raise ConfigError("kron_factor", f"kron_factor={f} does not divide {name}={dim} of {module}")
    return out_f // f, in_f // f


def _ldr_dims(r: int, out_f: int, in_f: int, module: str = "the linear") -> tuple[int, int]:
    n = max(out_f, in_f)
    if r > n:
        raise ConfigError("ldr_rank", f"ldr_rank={r} exceeds N = max(out, in) = {n} of {module}")
    return r, n


@cache
def _toeplitz_len(n: int) -> int:
    """Smallest 5-smooth length >= 2n - 1 (fast FFT sizes; 2n always qualifies when n is smooth)."""
    m = max(2 * n - 1, 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class SurmMethod(AdapterMethod):
    name: ClassVar[str] = "surm"
    peft_type: ClassVar[str] = "SURM"
    default_learning_rate: ClassVar[float] = 1e-2
    config_cls: ClassVar[type[MethodConfig]] = SurmConfig

    def learning_rate_for(self, cfg: SurmConfig) -> float:
        """ldr: each ΔW entry sums r·N products, so Adam moves it far more per step than the other
        variants' one product; 1e-2 diverged in one step on SmolLM2 (docs/adapter-format.md)."""
        return 1e-3 if cfg.variant == "ldr" else self.default_learning_rate

    # ---- configuration -------------------------------------------------------------------
    def param_specs(self, cfg: SurmConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        n = max(out_f, in_f)
        if cfg.variant == "circulant":
            return {"surm_r1": ParamSpec((n,)), "surm_r2": ParamSpec((n,))}
        if cfg.variant == "toeplitz":
            return {"surm_a": ParamSpec((n,)), "surm_b": ParamSpec((n,))}
        if cfg.variant == "ldr":
            r, n = _ldr_dims(cfg.ldr_rank, out_f, in_f, f"a [{out_f}, {in_f}] linear")
            return {"surm_g": ParamSpec((r, n)), "surm_h": ParamSpec((r, n))}
        f = cfg.kron_factor
        out_b, in_a = _kron_dims(f, out_f, in_f, f"a [{out_f}, {in_f}] linear")
        return {"surm_kron_A": ParamSpec((f, in_a)), "surm_kron_B": ParamSpec((out_b, f))}

    # ---- initialisation ------------------------------------------------------------------
    def init_params(
        self, cfg: SurmConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        specs = self.param_specs(cfg, out_f, in_f)
        dev = weight.device
        if mode not in ("identity", "train", "random"):
            raise ConfigError("init", f"unknown init mode {mode!r}")
        if cfg.variant == "ldr":
            return ldr.init(mode, cfg.ldr_rank, max(out_f, in_f), weight, generator)

        def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dev)

        def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1
            return (u * bound).to(dev)

        (n1, s1), (n2, s2) = specs.items()  # (trainable factor, zero factor at init)
        if mode in ("identity", "train"):
            if cfg.variant == "kronecker":  # A Kaiming-uniform (a=√5 → bound 1/√fan_in), B = 0
                first = uniform(s1.shape, 1.0 / math.sqrt(s1.shape[1]))
            else:
                first = randn(s1.shape, 0.02)
            return {n1: first, n2: torch.zeros(s2.shape, dtype=torch.float32, device=dev)}
        # Random, non-zero; ΔW entries ~0.3x the scale of W (toeplitz entries sum N products).
        w_std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
        target = 0.3 * (w_std if math.isfinite(w_std) and w_std > 0 else 1.0)
        if cfg.variant == "toeplitz":
            target /= math.sqrt(max(out_f, in_f))
        std = math.sqrt(target)
        return {n1: randn(s1.shape, std), n2: randn(s2.shape, std)}

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(
        self,
        cfg: SurmConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Explicit dense matrices: column j of circ(c) is c rolled down by j; column j of T(a)
        is ``[a_j, .., a_1, a_0, a_1, .., a_{N−1−j}]``; Kronecker by ``torch.kron``; LDR as the sum of
        products of dense ``Z_1(g_i)``, ``Z_{−1}(h_i)``, in the weight's precision (float64 stays so)."""
        out_f, in_f = weight.shape
        n = max(out_f, in_f)
        if cfg.variant == "ldr":
            dt = compute_dtype(weight.dtype)
            dw = ldr.reference_delta(params["surm_g"].to(dt), params["surm_h"].to(dt), out_f, in_f)
            return weight + cfg.alpha * dw.to(weight.dtype), bias
        p = {k: v.float() for k, v in params.items()}
        if cfg.variant == "circulant":
            c = p["surm_r1"] * p["surm_r2"]
            full = torch.stack([torch.roll(c, j) for j in range(n)], dim=1)  # [N, N]
        elif cfg.variant == "toeplitz":

            def toeplitz(a: torch.Tensor) -> torch.Tensor:
                cols = [torch.cat([a[1 : j + 1].flip(0), a[: n - j]]) for j in range(n)]
                return torch.stack(cols, dim=1)  # [N, N], T[i, j] = a[|i - j|]

            full = toeplitz(p["surm_b"]) @ toeplitz(p["surm_a"])
        else:
            full = torch.kron(p["surm_kron_B"], p["surm_kron_A"])  # [out, in]
        return weight + cfg.alpha * full[:out_f, :in_f].to(weight.dtype), bias

    def merged_weight(
        self,
        cfg: SurmConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out_f, in_f = weight.shape
        n = max(out_f, in_f)
        dev = weight.device
        p = {k: v.float() for k, v in params.items()}
        if cfg.variant == "ldr":
            dw = ldr.merged_delta(p["surm_g"], p["surm_h"], cfg.alpha, out_f, in_f)
            return weight + dw.to(weight.dtype), bias
        if cfg.variant == "kronecker":
            a, b = p["surm_kron_A"], p["surm_kron_B"]  # [f, in/f], [out/f, f]
            # (p, r, q, s) -> ΔW[p·f + r, q·(in/f) + s] = B[p, q] · A[r, s]
            dw = (b[:, None, :, None] * a[None, :, None, :]).reshape(out_f, in_f)
        else:
            diff = torch.arange(out_f, device=dev)[:, None] - torch.arange(in_f, device=dev)[None, :]
            if cfg.variant == "circulant":
                dw = (p["surm_r1"] * p["surm_r2"])[diff % n]  # gather c[(i − j) mod N]
            else:
                rows = torch.arange(n, device=dev)
                t_b = p["surm_b"][(rows[:out_f, None] - rows[None, :]).abs()]  # [out, N]
                t_a = p["surm_a"][(rows[:, None] - rows[None, :in_f]).abs()]  # [N, in]
                dw = t_b @ t_a
        return weight + cfg.alpha * dw.to(weight.dtype), bias

    # ---- batched on-the-fly path ---------------------------------------------------------
    def signature(self, cfg: SurmConfig, out_f: int, in_f: int) -> SurmSig:
        return SurmSig(cfg.variant, out_f, in_f, cfg.kron_factor, cfg.ldr_rank)  # None off their variant

    def prepare(
        self, cfg: SurmConfig, params: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        n = max(out_f, in_f)
        p = {k: v.float() for k, v in params.items()}
        if cfg.variant == "ldr":
            return ldr.spectra(p["surm_g"], p["surm_h"], cfg.alpha)  # ldr_h [r, N, 2], ldr_g [r, N//2+1, 2]
        if cfg.variant == "circulant":
            c = cfg.alpha * (p["surm_r1"] * p["surm_r2"])
            return {"spec": torch.view_as_real(torch.fft.rfft(c, n=n))}  # [N//2 + 1, 2]
        if cfg.variant == "toeplitz":
            length = _toeplitz_len(n)

            def spectrum(v: torch.Tensor) -> torch.Tensor:  # real: the embedding column is symmetric
                col = torch.cat([v, v.new_zeros(length - 2 * n + 1), v[1:].flip(0)])  # [L]
                return torch.fft.rfft(col).real  # [L//2 + 1]

            spec = torch.stack([spectrum(p["surm_a"]), cfg.alpha * spectrum(p["surm_b"])])  # [2, L//2+1]
            # Duplicated to [2, L//2+1, 2] to scale the (re, im) pairs of a real view: a dense
            # elementwise product (broadcasting a size-1 last dim is several times slower on CPU).
            return {"spec": torch.stack([spec, spec], dim=-1)}
        # One table tensor [in + out] = [A.flatten(), α·B.flatten()]: a single gather per step.
        return {"AB": torch.cat([p["surm_kron_A"].flatten(), cfg.alpha * p["surm_kron_B"].flatten()])}

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"delta"})

    def delta(
        self, sig: SurmSig, x: torch.Tensor, table: dict, slots: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        variant, out_f, in_f, f = sig.variant, sig.out_f, sig.in_f, sig.kron_factor
        n = max(out_f, in_f)
        xf = x.to(compute_dtype(x.dtype))  # [R, in]
        if variant == "ldr":
            dy = ldr.apply(xf, per_row(table["ldr_h"], slots), per_row(table["ldr_g"], slots), n, out_f)
        elif variant == "circulant":
            spec = torch.view_as_complex(per_row(table["spec"], slots).float())  # [R|1, N//2+1]
            dy = torch.fft.irfft(torch.fft.rfft(xf, n=n) * spec, n=n)[..., :out_f]
        elif variant == "toeplitz":
            length = _toeplitz_len(n)
            spec = per_row(table["spec"], slots).float()  # [R|1, 2, L//2+1, 2], real spectra

            def conv(v: torch.Tensor, k: int) -> torch.Tensor:  # circ_L(column k) v, real x real mul
                vh = torch.view_as_real(torch.fft.rfft(v, n=length))  # [R, L//2+1, 2]
                return torch.fft.irfft(torch.view_as_complex(vh * spec[:, k]), n=length)  # [R, L]

            u = conv(xf, 0)  # T(a) x in u[:, :N]; the rest is wrap-around
            u[..., n:] = 0  # truncate to N (in place: irfft's backward does not need its output)
            dy = conv(u, 1)[..., :out_f]
        else:
            ab = per_row(table["AB"], slots).to(xf.dtype)  # [R|1, in + out]
            a = ab[:, :in_f].unflatten(1, (f, in_f // f))  # [R|1, f, in/f]
            b = ab[:, in_f:].unflatten(1, (out_f // f, f))  # [R|1, out/f, f]
            xm = xf.reshape(-1, f, in_f // f)  # [R, f, in/f]
            if f * (in_f + out_f) <= 2 * out_f * in_f // f:
                y = b @ (xm @ a.transpose(-1, -2))  # [R, out/f, f]
            else:
                y = (b @ xm) @ a.transpose(-1, -2)
            dy = y.reshape(*x.shape[:-1], out_f)  # [R, out], index p·f + r
        return dy.to(x.dtype)

    def serving_cost(self, sig: Hashable) -> Literal["cheap", "gemm"]:
        return "cheap"

    def fast_op(self, kernels, sig: SurmSig, hook: str, shared) -> FastOp | None:
        """Circulant and Toeplitz share the input's real FFT between sibling projections (q/k/v,
        gate/up read the same activations); Kronecker is two small per-row products. LDR has no
        kernel: its torch code (``_surm_ldr.apply``) serves it."""
        if hook != "delta" or sig.variant == "ldr":
            return None
        n = max(sig.out_f, sig.in_f)
        if sig.variant == "circulant":

            def circulant(y, x, g):
                spec = shared.spectrum(("rfft", n), x, g.rows, lambda: kernels.rfft_rows(x, g.rows, n))
                kernels.circulant_apply_(y, spec, g.rows, g.slots, g.table["spec"], n)

            return circulant
        if sig.variant == "toeplitz":
            length = _toeplitz_len(n)

            def toeplitz(y, x, g):
                spec = shared.spectrum(
                    ("rfft", length), x, g.rows, lambda: kernels.rfft_rows(x, g.rows, length)
                )
                kernels.toeplitz_apply_(y, spec, g.rows, g.slots, g.table["spec"], n, length)

            return toeplitz
        f = sig.kron_factor
        return lambda y, x, g: kernels.kronecker_add_(y, x, g.rows, g.slots, g.table["AB"], f)

    def kernel_max_rows(self, sig: SurmSig, hook: str) -> int | None:
        return KRON_KERNEL_MAX_ROWS if sig.variant == "kronecker" else None

    def native_op(self, kernels, sig: SurmSig, hook: str, g, shared):
        n = max(sig.out_f, sig.in_f)
        if sig.variant == "circulant":
            return kernels.op_circulant(g.rows, g.slots, g.table["spec"], n, shared.spectra, shared.scope)
        if sig.variant == "toeplitz":
            length = _toeplitz_len(n)
            return kernels.op_toeplitz(
                g.rows, g.slots, g.table["spec"], n, length, shared.spectra, shared.scope
            )
        return kernels.op_kronecker_add(g.rows, g.slots, g.table["AB"], sig.kron_factor)


register_method(SurmMethod())
