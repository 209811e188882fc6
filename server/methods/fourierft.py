"""FourierFT (PEFT ``peft_type: FOURIERFT``): a sparse spectrum of the update in the 2-D DFT domain.

PEFT stores per linear only the trained coefficients ``c = fourierft_spectrum [n]``. Their spectral
positions are not in the file: PEFT draws them from the config, and so does Facet, with the same
call (``peft_positions``): ``torch.randperm(out·in, generator=torch.Generator().manual_seed(
random_loc_seed))[:n]``, read row-major as ``(u_j, v_j) = (k // in, k % in)``. With ``s = scaling``:

    ΔW = s · Re(ifft2(S)),   S [out, in] zero except S[u_j, v_j] = c_j
       = s/(out·in) · Σ_j c_j cos(2π (u_j p / out + v_j q / in))       (entry p, q),    b' = b.

On the fly (``delta``), per row with ``X = fft(x)``: ``Δy = (s/in) · Re(ifft_out(Z))`` where
``Z[u_j] += c_j · conj(X[v_j])``. Both transforms are real FFTs: ``x`` goes through one ``rfft``
(shared by every slot of the group), each term gathers the real and the imaginary part of its
input bin and scatters them into the half spectrum of the output, which one ``irfft`` turns into
``Δy``. ``prepare`` folds every per-position constant (the conjugations that mirror a bin into the
half spectrum, the 1/2 of a bin that stands for two, ``s/in``) into two real coefficients per
position. Cost per token: ``in·log in + out·log out`` for the FFTs plus ``4·n_pad`` gathers,
multiply-adds and scatters, against ``in·out`` for the dense delta GEMM (576×576, n = 1000:
~2·10⁴ vs 3.3·10⁵). Past ``4·n_pad >= in·out`` the sparse form costs no less than a dense update, and
``serving_cost`` says "gemm" (the engine then serves the adapter merged, by its policy).

Config (PEFT 0.21): ``n_frequency``, ``scaling``, ``random_loc_seed`` and the per-module
``n_frequency_pattern`` (PEFT's rule, see ``c3a.peft_pattern_key``) are honoured; ``bias`` must be
"none"; ``fan_in_fan_out``, ``modules_to_save``, ``exclude_modules``, ``layers_to_transform`` and
``layers_pattern`` are refused by name. ``init_weights`` only chooses the init (PEFT: True zeros,
the identity; False N(0, 1)).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, StrictBool, StrictInt, field_validator

from .base import (
    AdapterMethod,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    Scale,
    compute_dtype,
    per_row,
)
from .c3a import check_pattern_keys, peft_pattern_key
from .registry import register_method

PAD_MULTIPLE = 64  # serving pads n to a multiple of this, so adapters of nearby n share a slot table
NFrequency = Annotated[StrictInt, Field(ge=1)]
# Every value torch.Generator.manual_seed accepts (PEFT passes the seed there unchanged).
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)]


class FourierFTSig(NamedTuple):
    """Slot-table key: the shape and the padded number of coefficients."""

    family: str
    out_f: int
    in_f: int
    n_pad: int


class FourierFTConfig(PeftConfig):
    n_frequency: NFrequency = 1000
    scaling: Scale = 150.0
    random_loc_seed: Seed = 777
    n_frequency_pattern: dict[str, NFrequency] | None = Field(default_factory=dict)  # honoured
    init_weights: StrictBool = False  # init only
    peft_version: str | None = None

    _pattern = field_validator("n_frequency_pattern")(classmethod(lambda cls, v: check_pattern_keys(v)))

    def for_module(self, module: str) -> FourierFTConfig:
        """The n PEFT uses at ``module`` (``n_frequency_pattern``); the copy keeps the pattern."""
        key = peft_pattern_key(self.n_frequency_pattern or {}, module)
        if key is None or self.n_frequency_pattern[key] == self.n_frequency:
            return self
        return self.model_copy(update={"n_frequency": self.n_frequency_pattern[key]})

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        n = self.for_module(module).n_frequency
        if n > out_f * in_f:
            pattern = peft_pattern_key(self.n_frequency_pattern or {}, module) is not None
            raise ConfigError(
                "n_frequency_pattern" if pattern else "n_frequency",
                f"n_frequency={n} exceeds out*in={out_f}*{in_f}={out_f * in_f} of {module}",
            )


@lru_cache(maxsize=256)
def _positions_cpu(seed: int, out_f: int, in_f: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached tensors may be saved for a training backward
        flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
        return flat // in_f, flat % in_f


def peft_positions(cfg: FourierFTConfig, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v)``, long ``[n]`` on the CPU: the spectral rows and columns PEFT draws for this
    config (``cfg`` already for the module) on a ``[out, in]`` linear. Never modify them: cached."""
    cfg.check_shape(f"a [{out_f}, {in_f}] linear", out_f, in_f)
    return _positions_cpu(cfg.random_loc_seed, out_f, in_f, cfg.n_frequency)


class FourierFTMethod(AdapterMethod):
    name: ClassVar[str] = "fourierft"
    peft_type: ClassVar[str] = "FOURIERFT"
    config_cls: ClassVar[type[MethodConfig]] = FourierFTConfig
    # The FourierFT recipes' order with scaling 150-300 (tiny Llama, 40 steps: loss ratio .22 at 5e-2).
    default_learning_rate: ClassVar[float] = 5e-2

    def param_specs(self, cfg: FourierFTConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        cfg.check_shape(f"a [{out_f}, {in_f}] linear", out_f, in_f)
        return {"fourierft_spectrum": ParamSpec((cfg.n_frequency,))}

    def init_params(
        self, cfg: FourierFTConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``identity``: zeros; ``train``: PEFT's (zeros with ``init_weights``, else N(0, 1));
        ``random``: N(0, 1) scaled so that std(ΔW) is about 0.3·std(W)."""
        out_f, in_f = weight.shape
        n, dev = self.param_specs(cfg, out_f, in_f)["fourierft_spectrum"].shape[0], weight.device
        if mode == "identity" or (mode == "train" and cfg.init_weights):
            return {"fourierft_spectrum": torch.zeros(n, device=dev)}
        noise = torch.randn(n, generator=generator, device=generator.device).to(dev)
        if mode == "train":
            return {"fourierft_spectrum": noise}
        if mode != "random":
            raise ConfigError("init", f"unknown init mode {mode!r}")
        # Each c_j adds a cosine of amplitude |s c_j|/(out·in): RMS of ΔW ~ |s|·√(n/2)·std(c)/(out·in).
        w_std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
        w_std = w_std if math.isfinite(w_std) and w_std > 0 else 1.0
        size = 0.3 * w_std * out_f * in_f / ((abs(cfg.scaling) or 1.0) * math.sqrt(max(n / 2, 1)))
        return {"fourierft_spectrum": noise * size}

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(self, cfg: FourierFTConfig, params, weight, bias):
        """The cosine sum written out in float64 (phases reduced modulo one period)."""
        out_f, in_f = weight.shape
        u, v = (t.to(weight.device) for t in peft_positions(cfg, out_f, in_f))
        c = params["fourierft_spectrum"].to(weight.device, torch.float64)
        p = torch.arange(out_f, device=weight.device)
        q = torch.arange(in_f, device=weight.device)
        a = 2 * math.pi * ((u[:, None] * p[None, :]) % out_f).double() / out_f  # [n, out]
        b = 2 * math.pi * ((v[:, None] * q[None, :]) % in_f).double() / in_f  # [n, in]
        # cos(a + b) = cos a cos b − sin a sin b
        delta = (a.cos().T * c) @ b.cos() - (a.sin().T * c) @ b.sin()
        return (weight.double() + cfg.scaling / (out_f * in_f) * delta).to(weight.dtype), bias

    def merged_weight(self, cfg: FourierFTConfig, params, weight, bias):
        """PEFT's own form: the dense spectrum through ``ifft2``."""
        out_f, in_f = weight.shape
        u, v = (t.to(weight.device) for t in peft_positions(cfg, out_f, in_f))
        dtype = compute_dtype(weight.dtype)
        c = params["fourierft_spectrum"].to(weight.device, dtype)
        dense = torch.zeros(out_f, in_f, device=weight.device, dtype=dtype).index_put((u, v), c)
        return (weight + cfg.scaling * torch.fft.ifft2(dense).real).to(weight.dtype), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: FourierFTConfig, out_f: int, in_f: int) -> FourierFTSig:
        return FourierFTSig("fourierft", out_f, in_f, -(-cfg.n_frequency // PAD_MULTIPLE) * PAD_MULTIPLE)

    def serving_cost(self, sig: FourierFTSig) -> Literal["cheap", "gemm"]:
        return "gemm" if 4 * sig.n_pad >= sig.out_f * sig.in_f else "cheap"

    def hooks(self, sig: FourierFTSig) -> frozenset[str]:
        return frozenset({"delta"})

    def prepare(self, cfg: FourierFTConfig, params, weight):
        """``pos [2, 2·n_pad]``: per term the flat index read in the input half spectrum (real view
        of ``rfft(x)``) and the one written in the output's; ``coef [2·n_pad]``: its factor. Terms
        0..n-1 carry real parts, n_pad.. the imaginary ones; padding (coef 0, index 0) adds 0."""
        out_f, in_f = weight.shape
        n_pad = self.signature(cfg, out_f, in_f).n_pad
        dev = weight.device
        u, v = (t.to(dev) for t in peft_positions(cfg, out_f, in_f))
        c = params["fourierft_spectrum"]
        c = c.to(dev, compute_dtype(c.dtype))
        # Input: X[v] is rfft bin v (v <= in/2) or the conjugate of bin in − v; c·conj(X[v]) then
        # has imaginary part ∓ c·Im(bin).
        mirror_in = v > in_f // 2
        v_bin = torch.where(mirror_in, in_f - v, v)
        sign_in = torch.where(mirror_in, 1.0, -1.0).to(c.dtype)
        # Output: Re(ifft(Z)) = irfft(H) with H[u] += z/2 (0 < u < out/2), H[out − u] += conj(z)/2
        # (u > out/2), and H[u] += Re(z) at the bins irfft reads as real (0, and out/2 if even).
        mirror_out = u > out_f // 2
        u_bin = torch.where(mirror_out, out_f - u, u)
        real_bin = (u_bin == 0) | (2 * u_bin == out_f)
        sign_out = torch.where(mirror_out, -1.0, 1.0).to(c.dtype)
        scale = cfg.scaling / in_f
        coef_re = scale * c * torch.where(real_bin, 1.0, 0.5).to(c.dtype)
        coef_im = scale * c * torch.where(real_bin, 0.0, 0.5).to(c.dtype) * sign_in * sign_out
        pad = n_pad - c.shape[0]
        read = torch.cat([F.pad(2 * v_bin, (0, pad)), F.pad(2 * v_bin + 1, (0, pad))])
        write = torch.cat([F.pad(2 * u_bin, (0, pad)), F.pad(2 * u_bin + 1, (0, pad))])
        coef = torch.cat([F.pad(coef_re, (0, pad)), F.pad(coef_im, (0, pad))])
        return {"pos": torch.stack([read, write]), "coef": coef}  # [2, 2·n_pad], [2·n_pad]

    def delta(self, sig: FourierFTSig, x, table, slots, weight):
        out_f, n_pad = sig.out_f, sig.n_pad
        rows, dtype = x.shape[0], compute_dtype(x.dtype)
        spec = torch.view_as_real(torch.fft.rfft(x.to(dtype), dim=-1)).flatten(-2)  # [R, 2(in//2+1)]
        pos = per_row(table["pos"], slots).expand(rows, 2, 2 * n_pad)
        terms = spec.gather(1, pos[:, 0]) * per_row(table["coef"], slots).to(dtype)  # [R, 2·n_pad]
        out = torch.zeros(rows, 2 * (out_f // 2 + 1), device=x.device, dtype=dtype)
        out.scatter_add_(1, pos[:, 1], terms)
        return torch.fft.irfft(torch.view_as_complex(out.unflatten(-1, (-1, 2))), n=out_f).to(x.dtype)


register_method(FourierFTMethod())
