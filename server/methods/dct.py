"""sDCTFT: a sparse spectrum of the weight update in the orthonormal 2-D DCT domain (peft_type "DCT").

PyTorch layout: ``W [out, in]``, ``y = x W^T + b``. ``C_N`` is the orthonormal DCT-II matrix,
``C_N[k, m] = s_k cos(pi (m + 1/2) k / N)`` with ``s_0 = sqrt(1/N)``, ``s_k = sqrt(2/N)`` (``C C^T = I``).

    W' = W + alpha * C_out^T S C_in,    S [out, in] zero except S[u_j, v_j] = c_j  (j < n)
       = W + alpha * sum_j c_j * outer(C_out[u_j], C_in[v_j])

Stored per adapted linear: ``dct_coef [n]`` (trainable ``c``), ``dct_rows [n]`` and ``dct_cols [n]``
(int32 positions ``u``, ``v``). Positions are chosen once, at training init, by ``select_positions``
from the pretrained weight's spectrum; serving never re-derives them.

On the fly (a mixed batch): ``x_hat = x C_in^T`` (the DCT of each row, shared by every row),
``z[u_j] += c_j * x_hat[v_j]`` per row with its slot's positions, ``dy = alpha * z C_out``. Both
transforms run as one length-N real FFT each (Makhoul's even/odd reordering, see ``_plan``), which
costs far less than the dense ``[N, N]`` GEMMs at SmolLM2 sizes; the gather reads, and the scatter
writes, the half-spectra directly, with every per-position constant folded into the slot's
coefficients by ``prepare``.

Scale: ``C`` is orthonormal, so ``||Delta W||_F = alpha ||c||`` and ``c`` is in the units of the
weight's spectrum. Default ``scaling = 1`` (c starts at 0, so alpha only sets the effective step
size: Adam moves Delta W by ~alpha*lr per coefficient and step). FourierFT's recipe (scale 300,
lr 0.05, ifft2 normalised by 1/(out*in)) corresponds to ``scaling * lr = 15 / sqrt(2 out in)``
here: lr ~0.02 at 576x576, ~0.003 at 4096x4096 with scaling 1.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import lru_cache
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt, field_validator

from .adapter import KEY_PREFIX
from .base import (
    AdapterMethod,
    ConfigError,
    FastOp,
    InitMode,
    MethodConfig,
    ParamSpec,
    Scale,
    StrictNumber,
    WeightsError,
    compute_dtype,
    per_row,
)
from .registry import register_method

PAD_MULTIPLE = 64  # serving pads n to a multiple of this, so adapters of nearby n share a slot table


class DCTConfig(MethodConfig):
    peft_type: str = "DCT"
    n_frequency: StrictInt = Field(
        700, ge=1, description="n: trained spectral coefficients per adapted linear"
    )
    scaling: Scale = Field(
        1.0, description="alpha in W' = W + alpha * C_out^T S C_in; 0 < |alpha| <= MAX_SCALE"
    )
    delta: StrictNumber = Field(0.7, ge=0.0, le=1.0, description="share of each band taken by top energy")
    n_bands: StrictInt = Field(3, ge=1, le=64, description="frequency bands by distance from the DC corner")
    selection_seed: StrictInt = Field(42, ge=0, lt=2**63, description="seed of the random share of positions")
    dct_norm: Literal["ortho"] = "ortho"

    @field_validator("peft_type")
    @classmethod
    def _is_dct(cls, v: str) -> str:
        if v.upper() != "DCT":
            raise ValueError(f"peft_type must be 'DCT' for this family, got {v!r}")
        return "DCT"

    @field_validator("scaling")
    @classmethod
    def _scaling_ok(cls, v: float) -> float:
        if not math.isfinite(v) or v == 0.0:
            raise ValueError(f"scaling must be finite and non-zero, got {v}")
        return v

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        if self.n_frequency > out_f * in_f:
            raise ConfigError(
                "n_frequency",
                f"n_frequency={self.n_frequency} exceeds out*in={out_f}*{in_f}={out_f * in_f} of {module}",
            )


# ---- transforms (cached constants are pure functions of N, device, dtype) -----------------------


class DctSig(NamedTuple):
    """Slot-table key: the shape and the padded number of coefficients."""

    family: str
    out_f: int
    in_f: int
    n_pad: int


class _Plan(NamedTuple):
    """Constants of the length-N real-FFT forms of the orthonormal DCT (Makhoul's reordering).

    Spectra are handled as ``flat [..., 2(N//2+1)]``, the real view (re, im interleaved) of the
    N//2+1 rfft bins. Coefficient k of the DCT (or of the inverse's input) lives in the real slot
    of bin k for k <= N/2 and in the imaginary slot of bin N - k above.
    """

    perm: torch.Tensor  # [N] long: rfft input x[perm] = (x0, x2, x4, ..., x5, x3, x1)
    unperm: torch.Tensor  # [N] long: its inverse, applied to the irfft output
    slot: torch.Tensor  # [N] long: flat index of coefficient k (2k, or 2(N-k)+1 for k > N/2)
    fwd: torch.Tensor  # [N//2+1] complex: e^{-i pi k/2N}: (x C^T)[k] = fwd_scale[k] * flat[slot[k]]
    fwd_scale: torch.Tensor  # [N] float: s_k (k <= N/2) or -s_k
    inv: torch.Tensor  # [N//2+1] complex: e^{+i pi k/2N} (sqrt 2 at k = N/2 for even N)
    inv_scale: torch.Tensor  # [N] float: put inv_scale[u] z_u at slot[u]; then irfft gives z C


@lru_cache(maxsize=64)
def _plan(n: int, device: torch.device, dtype: torch.dtype) -> _Plan:
    # Built with inference mode off: serving may fill this cache under ``torch.inference_mode``,
    # and a training thread must be able to save these constants for backward.
    with torch.inference_mode(False):
        return _build_plan(n, device, dtype)


def _build_plan(n: int, device: torch.device, dtype: torch.dtype) -> _Plan:
    k = torch.arange(n, dtype=torch.float64)
    s = torch.full_like(k, math.sqrt(2.0 / n))
    s[0] = math.sqrt(1.0 / n)
    perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
    bins = torch.arange(n // 2 + 1, dtype=torch.float64)
    low = 2 * k <= n
    # Makhoul: DCT-II  X_k = Re(e^{-i pi k/2N} V_k), V = rfft(x[perm]), V_{N-k} = conj(V_k);
    # DCT-III  y = unperm(irfft(B)), B_k = e^{i pi k/2N} (Z_k - i Z_{N-k}) with Z_0 = N s_0 z_0,
    # Z_k = N/2 s_k z_k (Z_N = 0; B_{N/2} = sqrt 2 Z_{N/2} for even N).
    inv = torch.polar(torch.ones_like(bins), math.pi * bins / (2 * n))
    if n % 2 == 0:
        inv[n // 2] = math.sqrt(2.0)
    zeta = torch.full_like(k, n / 2.0)
    zeta[0] = float(n)
    ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return _Plan(
        perm=perm.to(device),
        unperm=torch.argsort(perm).to(device),
        slot=torch.where(low, 2 * k, 2 * (n - k) + 1).long().to(device),
        fwd=torch.polar(torch.ones_like(bins), -math.pi * bins / (2 * n)).to(device, ctype),
        fwd_scale=torch.where(low, s, -s).to(device, dtype),
        inv=inv.to(device, ctype),
        inv_scale=torch.where(low, zeta * s, -zeta * s).to(device, dtype),
    )


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """``flat [..., 2(N//2+1)]`` of ``x [..., N]``: the twiddled rfft of the reordered rows."""
    plan = _plan(x.shape[-1], x.device, x.dtype)
    spec = torch.fft.rfft(x.index_select(-1, plan.perm)) * plan.fwd  # [..., N//2+1] complex
    return torch.view_as_real(spec).flatten(-2)


def _from_spectrum(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``[..., N]`` from ``flat [..., 2(N//2+1)]`` filled at ``slot`` with ``inv_scale`` factors."""
    plan = _plan(n, flat.device, flat.dtype)
    bins = torch.view_as_complex(flat.unflatten(-1, (n // 2 + 1, 2))) * plan.inv
    return torch.fft.irfft(bins, n=n).index_select(-1, plan.unperm)


def dct_rows(x: torch.Tensor) -> torch.Tensor:
    """``x C_N^T`` for ``x [..., N]``: the orthonormal DCT-II of each row (one length-N real FFT)."""
    plan = _plan(x.shape[-1], x.device, x.dtype)
    return _spectrum(x).index_select(-1, plan.slot) * plan.fwd_scale


def idct_rows(z: torch.Tensor) -> torch.Tensor:
    """``z C_N`` for ``z [..., N]``: the orthonormal inverse DCT of each row (one length-N real IFFT)."""
    n = z.shape[-1]
    plan = _plan(n, z.device, z.dtype)
    flat = z.new_zeros(*z.shape[:-1], 2 * (n // 2 + 1)).index_copy(-1, plan.slot, z * plan.inv_scale)
    return _from_spectrum(flat, n)


# ---- position selection (training init only) --------------------------------------------------


def band_index(out_f: int, in_f: int, n_bands: int) -> torch.Tensor:
    """Band of every position, ``[out, in]`` long: band b holds ``b D/B < d <= (b+1) D/B``.

    ``d = sqrt(u^2 + v^2)`` from the DC corner, ``D = sqrt((out-1)^2 + (in-1)^2)`` (the largest d);
    band 0 also holds d = 0. Decided in exact integer arithmetic (``B^2 d^2 <= (b+1)^2 D^2``), so
    positions exactly on a boundary fall in the lower band.
    """
    u = torch.arange(out_f, dtype=torch.int64)[:, None]
    v = torch.arange(in_f, dtype=torch.int64)[None, :]
    d2 = u * u + v * v  # [out, in]
    big_d2 = (out_f - 1) ** 2 + (in_f - 1) ** 2
    if big_d2 == 0:
        return torch.zeros(out_f, in_f, dtype=torch.int64)
    b = (torch.ceil(n_bands * torch.sqrt(d2.double() / big_d2)).long() - 1).clamp(0, n_bands - 1)
    lhs = n_bands * n_bands * d2
    b = b + (lhs > (b + 1) ** 2 * big_d2).long()  # float estimate one too low
    b = b - ((b > 0) & (lhs <= b * b * big_d2)).long()  # or one too high
    return b.clamp(0, n_bands - 1)


def band_quotas(sizes: list[int], n: int) -> list[int]:
    """How many positions each band gives: ``n // B`` each, the last band the remainder.

    A band with fewer positions than asked gives all it has and passes the shortfall to the next
    band; what is still missing after the last band is taken from the spare room of the bands
    before it, highest first.
    """
    n_bands = len(sizes)
    if n > sum(sizes):
        raise ValueError(f"n={n} exceeds the {sum(sizes)} positions of the matrix")
    asked = [n // n_bands] * (n_bands - 1) + [n - (n_bands - 1) * (n // n_bands)]
    take, carry = [], 0
    for size, want in zip(sizes, asked, strict=True):
        take.append(min(size, want + carry))
        carry = want + carry - take[-1]
    for b in reversed(range(n_bands)):
        extra = min(carry, sizes[b] - take[b])
        take[b] += extra
        carry -= extra
    return take


def select_positions(
    weight: torch.Tensor, n: int, delta: float = 0.7, n_bands: int = 3, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """sDCTFT's selection: per band, the top ``ceil(delta * k_b)`` positions by spectral energy of the
    pretrained ``weight`` and ``k_b - ceil(delta * k_b)`` uniformly at random (seeded) among the rest
    of the band; ``k_b`` from ``band_quotas``. Deterministic for a seed on any device (computed on
    the CPU in float64; energy ties go to the lower flat index). Returns ``(rows, cols)``, int32
    ``[n]`` on ``weight.device``, sorted by (row, col).
    """
    out_f, in_f = weight.shape
    w = weight.detach().to("cpu", torch.float64)
    energy = dct_rows(dct_rows(w).T).T.square().flatten()  # |C_out W C_in^T|^2, [out * in]
    band = band_index(out_f, in_f, n_bands).flatten()
    takes = band_quotas(torch.bincount(band, minlength=n_bands).tolist(), n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picked = []
    for b, k in enumerate(takes):  # a loop over the (few) bands, at training init only
        members = (band == b).nonzero().squeeze(1)  # flat indices, ascending
        e = energy[members]
        n_top = min(k, math.ceil(delta * k - 1e-9))  # tolerance: 0.7 * 10 -> 7, not 8
        is_top = torch.zeros_like(e, dtype=torch.bool)
        if n_top > 0:
            thr = torch.topk(e, n_top).values[-1]
            is_top = e > thr
            ties = (e == thr).nonzero().squeeze(1)  # ties at the threshold: lowest indices first
            is_top[ties[: n_top - int(is_top.sum())]] = True
        rest = members[~is_top]
        picked += [members[is_top], rest[torch.randperm(rest.numel(), generator=gen)[: k - n_top]]]
    flat = torch.cat(picked).sort().values
    return (flat // in_f).to(weight.device, torch.int32), (flat % in_f).to(weight.device, torch.int32)


# ---- the family ------------------------------------------------------------------------------


class DCTMethod(AdapterMethod):
    name = "dct"
    peft_type = "DCT"
    default_learning_rate: ClassVar[float] = 1e-2
    config_cls = DCTConfig

    def param_specs(self, cfg: DCTConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        n = cfg.n_frequency
        return {
            "dct_coef": ParamSpec((n,)),
            "dct_rows": ParamSpec((n,), trainable=False, kind="int32"),
            "dct_cols": ParamSpec((n,), trainable=False, kind="int32"),
        }

    def check_params(
        self, cfg: DCTConfig, module: str, params: dict[str, torch.Tensor], out_f: int, in_f: int
    ) -> None:
        rows, cols = params["dct_rows"].long(), params["dct_cols"].long()
        for pname, idx, size, side in (("dct_rows", rows, out_f, "out"), ("dct_cols", cols, in_f, "in")):
            bad = (idx < 0) | (idx >= size)
            if bad.any():
                j = int(bad.nonzero()[0])
                raise WeightsError(
                    f"{KEY_PREFIX}{module}.{pname}",
                    f"position {j} is {int(idx[j])}, outside [0, {size}) ({side}_features of {module})",
                )
        flat = rows * in_f + cols
        if torch.unique(flat).numel() != flat.numel():
            raise WeightsError(
                f"{KEY_PREFIX}{module}.dct_rows", f"duplicate (row, col) positions in {module}"
            )

    def init_params(
        self, cfg: DCTConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        cfg.check_shape("weight", out_f, in_f)
        n, dev = cfg.n_frequency, weight.device
        if mode in ("identity", "train"):
            rows, cols = select_positions(weight, n, cfg.delta, cfg.n_bands, cfg.selection_seed)
            return {"dct_coef": torch.zeros(n, device=dev), "dct_rows": rows, "dct_cols": cols}
        if mode != "random":
            raise ConfigError("init", f"unknown init mode {mode!r}")
        gd = generator.device
        flat = torch.randperm(out_f * in_f, generator=generator, device=gd)[:n]
        # ||Delta W||_F = |alpha| ||c||: aim at ~0.3 ||W||_F, every |c_j| in [0.5, 1.5] x the typical size.
        w_rms = float(weight.detach().float().square().mean().sqrt().clamp_min(1e-3))
        size = 0.3 * w_rms * math.sqrt(out_f * in_f / n) / abs(cfg.scaling)
        mag = 0.5 + torch.rand(n, generator=generator, device=gd)
        sign = torch.randint(0, 2, (n,), generator=generator, device=gd) * 2 - 1
        return {
            "dct_coef": (size * mag * sign).to(dev, torch.float32),
            "dct_rows": (flat // in_f).to(dev, torch.int32),
            "dct_cols": (flat % in_f).to(dev, torch.int32),
        }

    def reference_weight(
        self, cfg: DCTConfig, params: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out_f, in_f = weight.shape

        def cosine_basis(n: int) -> torch.Tensor:  # C[k, m], straight from the formula, float64
            k = torch.arange(n, dtype=torch.float64, device=weight.device)[:, None]
            m = torch.arange(n, dtype=torch.float64, device=weight.device)[None, :]
            s = ((2.0 - (k == 0).double()) / n).sqrt()  # sqrt(1/n) for k = 0, sqrt(2/n) above
            return s * torch.cos(math.pi * (m + 0.5) * k / n)

        c_out, c_in = cosine_basis(out_f), cosine_basis(in_f)
        u, v = (
            params["dct_rows"].to(weight.device, torch.long),
            params["dct_cols"].to(weight.device, torch.long),
        )
        coef = params["dct_coef"].to(weight.device, torch.float64)
        # Delta W = sum_j c_j outer(C_out[u_j], C_in[v_j])
        delta_w = torch.einsum("j,jo,ji->oi", coef, c_out[u], c_in[v])
        return (weight.double() + cfg.scaling * delta_w).to(weight.dtype), bias

    def merged_weight(
        self, cfg: DCTConfig, params: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out_f, in_f = weight.shape
        dtype = compute_dtype(weight.dtype)
        spec = torch.zeros(out_f, in_f, device=weight.device, dtype=dtype)  # dense S
        idx = (
            params["dct_rows"].to(weight.device, torch.long),
            params["dct_cols"].to(weight.device, torch.long),
        )
        spec = spec.index_put(idx, cfg.scaling * params["dct_coef"].to(weight.device, dtype), accumulate=True)
        # alpha C_out^T S C_in as two fast 1-D inverse DCTs: along out (columns of S), then along in.
        delta_w = idct_rows(idct_rows(spec.T.contiguous()).T.contiguous())  # [in,out] -> [out,in]
        return (weight + delta_w).to(weight.dtype), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: DCTConfig, out_f: int, in_f: int) -> DctSig:
        return DctSig("dct", out_f, in_f, -(-cfg.n_frequency // PAD_MULTIPLE) * PAD_MULTIPLE)

    def prepare(
        self, cfg: DCTConfig, params: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per slot: ``pos [2, n_pad]`` = (slot of v_j in the input spectrum, slot of u_j in the output
        one), int32 (half the bytes of int64: positions are below 2 (N/2+1)), and ``coef [n_pad]`` =
        alpha c_j times the fixed transform factors of v_j and u_j. Padding (c = 0, slots 0) is
        harmless."""
        out_f, in_f = weight.shape
        dev, n_pad = weight.device, self.signature(cfg, out_f, in_f).n_pad
        coef = params["dct_coef"]
        ftype = compute_dtype(coef.dtype)
        p_in, p_out = _plan(in_f, dev, ftype), _plan(out_f, dev, ftype)
        u, v = params["dct_rows"].to(dev, torch.long), params["dct_cols"].to(dev, torch.long)
        coef = cfg.scaling * coef.to(dev, ftype) * p_in.fwd_scale[v] * p_out.inv_scale[u]  # [n]
        pos = torch.stack([p_in.slot[v], p_out.slot[u]]).to(torch.int32)  # [2, n]
        pad = n_pad - coef.shape[0]
        return {"pos": F.pad(pos, (0, pad)), "coef": F.pad(coef, (0, pad))}  # [2, n_pad], [n_pad]

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"delta"})

    def delta(
        self, sig: Hashable, x: torch.Tensor, table: dict, slots: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        _, out_f, _, n_pad = sig
        rows = x.shape[0]
        dtype = compute_dtype(x.dtype)
        spec = _spectrum(x.to(dtype))  # [R, 2(in//2+1)]: the DCT of every row, shared by all slots
        pos = per_row(table["pos"], slots).long().expand(rows, 2, n_pad)  # gather wants int64
        terms = spec.gather(1, pos[:, 0]) * per_row(table["coef"], slots).to(dtype)  # [R, n_pad]
        out_spec = torch.zeros(rows, 2 * (out_f // 2 + 1), device=x.device, dtype=dtype)
        out_spec.scatter_add_(1, pos[:, 1], terms)  # z[u_j] += alpha c_j x_hat[v_j] (in spectrum slots)
        return _from_spectrum(out_spec, out_f).to(x.dtype)  # [R, out] = alpha z C_out

    def fast_op(self, kernels, sig: DctSig, hook: str, shared) -> FastOp | None:
        """The input's DCT spectrum is shared between sibling projections; the gather, scatter and
        inverse transform are per row with the slot's positions."""
        if hook != "delta":
            return None
        in_f, out_f = sig.in_f, sig.out_f

        def dct(y, x, g):
            perm, fwd, inv, unperm = kernel_plan(in_f, out_f, x.device)
            spec = shared.spectrum(
                ("dct", in_f), x, g.rows, lambda: kernels.dct_spectrum(x, g.rows, perm, fwd)
            )
            kernels.dct_apply_(y, spec, g.rows, g.slots, g.table["pos"], g.table["coef"], inv, unperm)

        return dct

    def native_op(self, kernels, sig: DctSig, hook: str, g, shared):
        perm, fwd, inv, unperm = kernel_plan(sig.in_f, sig.out_f, g.rows.device)
        pos, coef = g.table["pos"], g.table["coef"]
        return kernels.op_dct(
            g.rows, g.slots, pos, coef, perm, fwd, inv, unperm, shared.spectra, shared.scope
        )


@lru_cache(maxsize=64)
def kernel_plan(in_f: int, out_f: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The fused kernel's transform tables (float32): input permutation and forward twiddles, output
    inverse twiddles and un-permutation."""
    p_in = _plan(in_f, device, torch.float32)
    p_out = _plan(out_f, device, torch.float32)
    return (
        p_in.perm.contiguous(),
        torch.view_as_real(p_in.fwd).contiguous(),
        torch.view_as_real(p_out.inv).contiguous(),
        p_out.unperm.contiguous(),
    )


register_method(DCTMethod())
