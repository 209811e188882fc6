"""SURM's general low-displacement-rank family ``W(G, H) = Σ_{i<r} Z_1(g_i) Z_{−1}(h_i)``.

The math of ``variant="ldr"`` of ``server/methods/surm.py`` (the family registers there; this
module registers nothing, its leading underscore keeps it out of the family discovery).

``Z_f(v)`` is the ``N × N`` matrix with first column ``v`` whose strict upper triangle is
multiplied by ``f``: ``Z_f(v)[i, j] = v[i − j]`` for ``i ≥ j``, ``f · v[N + i − j]`` for ``i < j``.
``f = 1`` is the circulant ``Z_1(v)[i, j] = v[(i − j) mod N]``, ``f = −1`` the skew-circulant. With
``η_k = exp(iπk/N)`` (so ``η_N = −1``) and ``D = diag(η)``, ``Z_{−1}(v) = D⁻¹ circ(D v) D``, hence
the paper's product ``Z_{−1}(v) x = η̄ ⊙ ifft(fft(η ⊙ v) ⊙ fft(η ⊙ x))``.

``ΔW = α · W(G, H)[:out, :in]`` (the top-left block, as SURM's other variants). On the fly, per row:

1. ``X̂ = fft(η ⊙ x)`` once (``x`` zero-padded to N), shared by the r terms;
2. per term ``u_i = Re(η̄ ⊙ ifft(X̂ ⊙ Ĥ_i)) = Z_{−1}(h_i) x``, ``Ĥ_i = fft(η ⊙ h_i)`` (the slot's);
3. ``Z_1(g_i) u_i`` is a circular convolution, so the sum over i is taken in the frequency
   domain: ``Δy = irfft(Σ_i rfft(u_i) ⊙ Ĝ_i, n=N)[:out]``, ``Ĝ_i = α · rfft(g_i)``.

The twist between the two products (``η̄`` in the time domain) is not diagonal in the frequency
domain, so step 2 needs one inverse and one forward FFT per term: ``2r + 2`` FFTs of length N
per row (``O(r·N log N)``). FFTs run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import compute_dtype

# Displacement rank bound. r = N already spans every N × N matrix (so r ≤ N is checked per
# module too); 64 is 16x the paper's largest (r = 4, Llama-2-7B attention), and keeps the per-row
# cost (2r + 2 FFTs of length N) and the slot tables (≈ 3·r·N floats) small.
MAX_LDR_RANK = 64
TRAIN_STD = 0.02  # the paper's code: circulant part zero, skew part N(0, 0.02)


def twist(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``η_k = exp(iπk/N)`` as the complex dtype matching the real ``dtype`` (built fresh: a cached
    tensor made under inference mode could not be saved for a later backward)."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    eta = torch.polar(torch.ones_like(k), k * (math.pi / n))
    return eta.to(torch.complex128 if dtype == torch.float64 else torch.complex64)


# ---- dense forms ------------------------------------------------------------------------------
def z_matrix(v: torch.Tensor, f: float) -> torch.Tensor:
    """Explicit ``Z_f(v)`` [N, N]: column j is v rolled down by j, the j wrapped entries times f."""
    n = v.shape[0]
    return torch.stack([torch.cat([f * v[n - j :], v[: n - j]]) for j in range(n)], dim=1)


def reference_delta(g: torch.Tensor, h: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """``Σ_i Z_1(g_i) Z_{−1}(h_i)`` from dense matrices, top-left ``[out, in]`` block (the oracle)."""
    full = sum(z_matrix(gi, 1.0) @ z_matrix(hi, -1.0) for gi, hi in zip(g, h, strict=True))
    return full[:out_f, :in_f]


def merged_delta(g: torch.Tensor, h: torch.Tensor, alpha: float, out_f: int, in_f: int) -> torch.Tensor:
    """``α · W(G, H)[:out, :in]`` for merging: the on-the-fly operator applied to the identity's rows
    (row j gives column j), ``O(in · r · N log N)`` instead of the dense ``2·r·N·out·in``; the rows go
    in chunks so the ``[rows, r, N]`` intermediates stay near 32 MiB."""
    spec = spectra(g, h, alpha)
    n = g.shape[1]
    eye = torch.eye(in_f, dtype=compute_dtype(g.dtype), device=g.device)
    chunk = max(1, (1 << 22) // (g.shape[0] * n))
    cols = [
        apply(eye[s : s + chunk], spec["ldr_h"].unsqueeze(0), spec["ldr_g"].unsqueeze(0), n, out_f)
        for s in range(0, in_f, chunk)
    ]
    return torch.cat(cols).T  # [out, in]


# ---- on the fly -------------------------------------------------------------------------------
def spectra(g: torch.Tensor, h: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Per-slot tables: ``Ĥ = fft(η ⊙ h_i)`` [r, N, 2] and ``Ĝ = α · rfft(g_i)`` [r, N//2 + 1, 2],
    complex numbers as (re, im) pairs (real tables stack, round to bf16 and are checked as the
    other families')."""
    dt = compute_dtype(g.dtype)
    g, h = g.to(dt), h.to(dt)
    eta = twist(h.shape[1], dt, h.device)
    h_spec = torch.fft.fft(h * eta)
    g_spec = alpha * torch.fft.rfft(g)
    return {"ldr_h": torch.view_as_real(h_spec), "ldr_g": torch.view_as_real(g_spec)}


def apply(x: torch.Tensor, h_tab: torch.Tensor, g_tab: torch.Tensor, n: int, out_f: int) -> torch.Tensor:
    """``Δy = Σ_i Z_1(g_i) Z_{−1}(h_i) [x; 0]`` truncated to ``out`` for rows ``x [R, in]``.

    ``h_tab [R|1, r, N, 2]`` and ``g_tab [R|1, r, N//2+1, 2]`` are each row's slot tables (or one
    table broadcast over every row); returns ``[R, out]`` in the compute dtype of ``x``."""
    dt = compute_dtype(x.dtype)
    xf = F.pad(x.to(dt), (0, n - x.shape[-1]))  # [R, N]
    eta = twist(n, dt, x.device)
    h_spec = torch.view_as_complex(h_tab.to(dt).contiguous())  # [R|1, r, N]
    g_spec = torch.view_as_complex(g_tab.to(dt).contiguous())  # [R|1, r, N//2+1]
    x_hat = torch.fft.fft(xf * eta).unsqueeze(-2)  # [R, 1, N], shared by the r terms
    u = (torch.fft.ifft(x_hat * h_spec) * eta.conj()).real  # [R, r, N]: Z_{−1}(h_i) x, real
    acc = (torch.fft.rfft(u) * g_spec).sum(dim=-2)  # [R, N//2+1]: Σ_i of the circulant products
    return torch.fft.irfft(acc, n=n)[..., :out_f]


# ---- initialisation ---------------------------------------------------------------------------
def init(
    mode: str, r: int, n: int, weight: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``identity``/``train``: the paper's code, ``g = 0`` (so ΔW = 0) and ``h ~ N(0, 0.02)``.
    ``random``: both ~ N(0, s²) with ``s² · √(r·N) = 0.3 · std(W)`` (each ΔW entry sums r·N
    products), so the update is visible next to W and far from zero."""
    dev = weight.device

    def randn(std: float) -> torch.Tensor:
        return (torch.randn((r, n), generator=generator, dtype=torch.float32) * std).to(dev)

    if mode in ("identity", "train"):
        return {"surm_g": torch.zeros((r, n), dtype=torch.float32, device=dev), "surm_h": randn(TRAIN_STD)}
    w_std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
    target = 0.3 * (w_std if math.isfinite(w_std) and w_std > 0 else 1.0)
    std = math.sqrt(target / math.sqrt(r * n))
    return {"surm_g": randn(std), "surm_h": randn(std)}
