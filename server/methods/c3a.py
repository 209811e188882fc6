"""C3A: circular convolution adaptation (PEFT ``peft_type: C3A``), block-circulant, served on the fly.

PEFT stores one kernel per linear, ``c3a_kernel [m, n, b]`` with ``b = block_size`` dividing both
sides, ``m = out / b``, ``n = in / b``. The update is a grid of ``b × b`` circulant blocks whose
FIRST ROW is the kernel (PEFT's ``fft(ifft(x) ⊙ fft(w))`` is a circular cross-correlation), divided
by ``in`` (PEFT divides by ``x.size(-1)``):

    ΔW[M·b + i, N·b + j] = w[M, N, (j − i) mod b] / in,     W' = W + ΔW,   b' = b.

On the fly with ``x`` cut into ``n`` blocks ``x_N [b]``: ``Δy_M = Σ_N corr(x_N, w_MN) / in``, i.e.
in the Fourier domain ``rfft(Δy_M) = Σ_N rfft(x_N) ⊙ conj(rfft(w_MN)) / in``. ``prepare`` stores the
conjugated, scaled kernel spectra ``[m, n, b//2+1]``; per token that is ``n`` real FFTs of length b
(``in·log b``), ``m·n·(b/2+1) ≈ in·out/(2b)`` complex multiply-adds and ``m`` inverse FFTs
(``out·log b``), far below a dense ``in·out`` update for any b > 2. FFTs run in float32 at least
(bfloat16 has none), as PEFT's.

Config (PEFT 0.21): ``block_size`` and its per-module ``block_size_pattern`` (PEFT's rule: the
first key ``k`` with ``re.match(".*\\.k$", module)``, else the module's full name) are honoured;
``bias`` must be "none"; module selection beyond ``target_modules`` (``layers_to_transform``,
``layers_pattern``, ``exclude_modules``) and ``modules_to_save`` are refused by name.
``init_weights`` only chooses PEFT's init (``True``: zeros, the identity; ``"xavier_uniform"`` or
``False``: U(±√(6/(in+out))); ``"kaiming_uniform"``: U(±1/√in); ``"gaussian"``: N(0, 1)).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, NamedTuple

import torch
from pydantic import Field, StrictInt, field_validator

from .base import (
    AdapterMethod,
    ConfigError,
    InitMode,
    MethodConfig,
    ParamSpec,
    PeftConfig,
    compute_dtype,
    per_row,
    refuse,
)
from .registry import register_method

MAX_BLOCK = 1 << 16  # above any hidden size; every b must also divide the linear's sides
_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")
BlockSize = Annotated[StrictInt, Field(ge=1, le=MAX_BLOCK)]


class C3ASig(NamedTuple):
    """Slot-table key: the shape and the block size."""

    family: str
    out_f: int
    in_f: int
    block_size: int


def peft_pattern_key(pattern: dict, module: str) -> str | None:
    """The key of ``pattern`` PEFT's C3A/FourierFT tuners pick for ``module``: the first key ``k``
    (in file order) with ``re.match(rf".*\\.{k}$", module)``, else the module's full name if it is
    a key, else None (the config's default applies)."""
    for key in pattern:
        if re.match(rf".*\.{key}$", module):
            return key
    return module if module in pattern else None


def check_pattern_keys(pattern: dict | None) -> dict | None:
    """Every key must compile inside PEFT's ``.*\\.{key}$`` (a broken regex is refused by name)."""
    for key in pattern or {}:
        try:
            re.compile(rf".*\.{key}$")
        except re.error as e:
            raise refuse(f"{key!r} is not a regular expression ({e})") from None
    return pattern


class C3AConfig(PeftConfig):
    block_size: BlockSize = 256
    block_size_pattern: dict[str, BlockSize] | None = Field(default_factory=dict)  # honoured
    init_weights: Any = "xavier_uniform"  # init only: one of _INITS
    peft_version: str | None = None

    _pattern = field_validator("block_size_pattern")(classmethod(lambda cls, v: check_pattern_keys(v)))

    @field_validator("init_weights")
    @classmethod
    def _known_init(cls, v: Any) -> Any:
        if not any(v is i or (isinstance(v, str) and v == i) for i in _INITS):
            raise refuse(f"init_weights={v!r} is not one of PEFT's {list(_INITS)}")
        return v

    def for_module(self, module: str) -> C3AConfig:
        """The block size PEFT uses at ``module`` (``block_size_pattern``, see ``peft_pattern_key``).
        The copy keeps the pattern, so asking it again gives the same block size."""
        key = peft_pattern_key(self.block_size_pattern or {}, module)
        if key is None or self.block_size_pattern[key] == self.block_size:
            return self
        return self.model_copy(update={"block_size": self.block_size_pattern[key]})

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        b = self.for_module(module).block_size
        patterned = peft_pattern_key(self.block_size_pattern or {}, module) is not None
        where = "block_size_pattern" if patterned else "block_size"
        for side, dim in (("in_features", in_f), ("out_features", out_f)):
            if dim % b:
                raise ConfigError(where, f"block_size={b} does not divide {side}={dim} of {module}")


class C3AMethod(AdapterMethod):
    name: ClassVar[str] = "c3a"
    peft_type: ClassVar[str] = "C3A"
    config_cls: ClassVar[type[MethodConfig]] = C3AConfig
    # ΔW is kernel / in, so a step moves ΔW about lr / in per entry (tiny Llama, 40 steps: loss ratio
    # .61 at 1e-2, .08 at 1e-1; tests/jobs/test_train_c3a_fourierft.py).
    default_learning_rate: ClassVar[float] = 1e-1

    def param_specs(self, cfg: C3AConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        b = cfg.block_size
        cfg.check_shape(f"a [{out_f}, {in_f}] linear", out_f, in_f)
        return {"c3a_kernel": ParamSpec((out_f // b, in_f // b, b))}

    # ---- initialisation ------------------------------------------------------------------
    def init_params(
        self, cfg: C3AConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``identity``: zeros (PEFT's ``init_weights=True``); ``train``: PEFT's init for the config's
        ``init_weights``; ``random``: N(0, 1) scaled so that std(ΔW) = 0.3·std(W)."""
        out_f, in_f = weight.shape
        (shape,) = (s.shape for s in self.param_specs(cfg, out_f, in_f).values())
        dev, init = weight.device, cfg.init_weights

        def draw(kind: str) -> torch.Tensor:
            if kind == "normal":
                return torch.randn(shape, generator=generator, device=generator.device).to(dev)
            return (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1).to(dev)

        if mode == "identity" or (mode == "train" and init is True):
            return {"c3a_kernel": torch.zeros(shape, device=dev)}
        if mode == "random":  # ΔW entries are kernel entries / in
            w_std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
            w_std = w_std if math.isfinite(w_std) and w_std > 0 else 1.0
            return {"c3a_kernel": draw("normal") * (0.3 * w_std * in_f)}
        if mode != "train":
            raise ConfigError("init", f"unknown init mode {mode!r}")
        if init == "gaussian":
            return {"c3a_kernel": draw("normal")}
        bound = 1.0 / math.sqrt(in_f) if init == "kaiming_uniform" else math.sqrt(6.0 / (in_f + out_f))
        return {"c3a_kernel": draw("uniform") * bound}

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(self, cfg: C3AConfig, params, weight, bias):
        """Block by block, row by row: row i of a circulant block is the kernel rolled right by i."""
        w = params["c3a_kernel"].double()
        m, n, b = w.shape
        rows = torch.stack([torch.roll(w, i, dims=-1) for i in range(b)], dim=2)  # [m, n, b(i), b(j)]
        delta = rows.permute(0, 2, 1, 3).reshape(m * b, n * b) / weight.shape[1]
        return (weight.double() + delta).to(weight.dtype), bias

    def merged_weight(self, cfg: C3AConfig, params, weight, bias):
        w = params["c3a_kernel"].to(compute_dtype(weight.dtype))
        m, n, b = w.shape
        col = torch.arange(b, device=w.device)
        idx = (col[None, :] - col[:, None]) % b  # [b(i), b(j)]: (j − i) mod b
        delta = w[:, :, idx].permute(0, 2, 1, 3).reshape(m * b, n * b) / weight.shape[1]
        return (weight + delta).to(weight.dtype), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: C3AConfig, out_f: int, in_f: int) -> C3ASig:
        return C3ASig("c3a", out_f, in_f, cfg.block_size)

    def hooks(self, sig: C3ASig) -> frozenset[str]:
        return frozenset({"delta"})

    def prepare(self, cfg: C3AConfig, params, weight):
        """``spec [K, n, m, 2]`` (K = b//2 + 1): the real view of ``conj(rfft(w)) / in`` (float32 at
        least), frequency-major so that ``delta`` multiplies it in place, one matrix per frequency."""
        w = params["c3a_kernel"].to(compute_dtype(weight.dtype))
        spec = torch.fft.rfft(w, dim=-1).conj().resolve_conj() / weight.shape[1]  # [m, n, K]
        return {"spec": torch.view_as_real(spec.permute(2, 1, 0).contiguous())}

    def delta(self, sig: C3ASig, x, table, slots, weight):
        out_f, in_f, b = sig.out_f, sig.in_f, sig.block_size
        dtype = compute_dtype(x.dtype)
        xs = torch.fft.rfft(x.to(dtype).reshape(-1, in_f // b, b), dim=-1).transpose(1, 2)  # [R, K, n]
        spec = torch.view_as_complex(table["spec"].to(dtype))  # [S, K, n, m]
        if slots is None:  # training: one adapter on every row
            ys = torch.matmul(xs.unsqueeze(2), spec[0]).squeeze(2)
        elif x.is_cuda:
            ys = _gathered(xs, spec, slots)
        else:
            ys = _segmented(xs, spec, slots)
        return torch.fft.irfft(ys.transpose(1, 2), n=b, dim=-1).reshape(x.shape[0], out_f).to(x.dtype)


def _gathered(xs: torch.Tensor, spec: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row gathers its slot's spectra (``m·n·K`` complex numbers per row); no host sync."""
    return torch.matmul(xs.unsqueeze(2), per_row(spec, slots)).squeeze(2)  # [R, K, m]


def _segmented(xs: torch.Tensor, spec: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows regrouped per slot (padded to the largest group), one complex batched matmul per
    frequency over the slot spectra in place (CPU: copying every row's spectra was slower than a
    dense update at 1536x576, b = 64). The group size is read on the host (a sync)."""
    n_slots, k, n, m = spec.shape
    seen = (slots[:, None] == torch.arange(n_slots, device=slots.device)).cumsum(0)  # [R, S]
    t = int(seen[-1].max())  # largest group
    place = slots * t + seen.gather(1, slots[:, None]).view(-1) - 1  # row -> slot·t + rank in group
    xp = xs.new_zeros(n_slots * t, k, n).index_copy_(0, place, xs).view(n_slots, t, k, n)
    yp = torch.matmul(xp.transpose(1, 2), spec)  # [S, K, t, m]
    return yp.transpose(1, 2).reshape(n_slots * t, k, m).index_select(0, place)  # [R, K, m]


register_method(C3AMethod())
