"""Wrapped target linears and the per-step adapter binding.

``AdaptedLinear`` replaces each target ``nn.Linear`` once at load. It holds no adapter state:
each forward reads the *step binding* of the calling thread, a ``StepBinding`` built once per
step by the engine (or the trainer) and bound with ``bind(...)`` around the model call. With no
binding, or a binding that touches no adapter on this layer, the layer is exactly the base
linear (same op, same cost).

Why a context variable rather than a forward argument: Hugging Face models do not pass extra
arguments down to their MLP linears. A ``ContextVar`` is per thread, so a fine-tune job
training in one thread and the serving loop in another never see each other's binding, and
nothing on the layers is ever mutated ("no active adapter").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels.fast import SharedSpectra, fast_op, native_op
from server.methods import AdapterMethod, Group, MethodConfig, adapted_forward, batched_linear
from server.methods.batched import fusable

from .slots import SlotPool


class StepBinding:
    """What one forward pass applies. Subclasses decide per module path."""

    def apply(self, path: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class PoolRows:
    pool: SlotPool
    rows: torch.Tensor  # [R] token rows (flattened batch*time) using this pool
    slots: torch.Tensor  # [R] slot of each row in the pool


@dataclass
class MergedRows:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # path -> (W', b')
    rows: torch.Tensor | None  # None = every row of the step


@dataclass
class ServeBinding(StepBinding):
    """A serving step: rows grouped by slot pool (on the fly) and by merged adapter.

    ``kernels``: the fused CPU kernels (``server/kernels``), or None for the torch code. A
    binding is reused by the planner while a step's adapters do not change (decode), so the
    per-layer group lists are built once and cached here.
    """

    pools: list[PoolRows] = field(default_factory=list)
    merged: list[MergedRows] = field(default_factory=list)
    kernels: object | None = None
    _groups: dict[str, list[Group]] = field(default_factory=dict, repr=False)
    _spectra: SharedSpectra = field(default_factory=SharedSpectra, repr=False)
    _runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict, repr=False)
    _native_spectra: object | None = field(default=None, repr=False)

    def _groups_of(self, path: str) -> list[Group]:
        groups = self._groups.get(path)
        if groups is None:
            groups = self._groups[path] = [
                Group(pr.pool.method, pr.pool.sigs[path], pr.pool.tables[path], pr.rows, pr.slots)
                for pr in self.pools
                if path in pr.pool.tables
            ]
            scope = path.rpartition(".")[0]  # q/k/v (and gate/up) share their input's spectra
            for g in groups:
                for hook in g.hooks:
                    rows = None if g.rows is None else g.rows.numel()
                    f = fast_op(self.kernels, g.method, g.sig, hook, self._spectra, scope, rows)
                    if f is not None:
                        g.fused[hook] = f
        return groups

    def apply(self, path: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        run = self._runs.get(path)
        if run is None:
            run = self._runs[path] = self._run_for(path, base)
        return run(x)

    def _run_for(self, path: str, base: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``apply`` does on ``path`` for this binding, decided once (a binding is reused
        across decode steps, and a step calls every projection once per layer)."""
        if len(self.merged) == 1 and self.merged[0].rows is None and not self.pools:
            w = self.merged[0].weights.get(path)  # the whole step is one merged adapter
            return base if w is None else lambda x: F.linear(x, w[0], w[1])
        groups = self._groups_of(path)
        merged = [m for m in self.merged if path in m.weights]
        if not groups and not merged:
            return base
        # The lean path: its GEMM is a plain one (see rows_linear for the widths it may not take).
        odd_bf16 = base.weight.dtype == torch.bfloat16 and base.in_features % 2
        if not merged and not odd_bf16 and all(h in g.fused for g in groups for h in g.hooks):
            return self._native_plan(path, base, groups) or _fused_plan(base, groups)
        return lambda x: self._batched(path, x, base, groups, merged)

    def _native_plan(self, path: str, base: nn.Linear, groups: list[Group]):
        """``_fused_plan`` as one call into the compiled module (``Projection``: the same kernels
        and ATen ops in the same order, bound once to the groups), or None where some group's
        family has no native op."""
        k = self.kernels
        if k is None or not hasattr(k, "Projection"):
            return None
        if self._native_spectra is None:
            self._native_spectra = k.Spectra()
        scope = path.rpartition(".")[0]
        ops: dict[str, list] = {"pre": [], "post": [], "delta": []}
        for g in groups:
            for hook in ("pre", "post", "delta"):
                if hook in g.hooks:
                    op = native_op(k, g.method, g.sig, hook, g, self._native_spectra, scope)
                    if op is None:
                        return None
                    ops[hook].append(op)
        proj = k.Projection(base.weight, base.bias, ops["pre"], ops["post"], ops["delta"])
        weight, bias = base.weight, base.bias

        def run(x: torch.Tensor) -> torch.Tensor:
            y = proj.run(x)
            return batched_linear(x, weight, bias, groups) if y is None else y

        return run

    def _batched(self, path, x, base, groups: list[Group], merged: list[MergedRows]) -> torch.Tensor:
        y = batched_linear(x, base.weight, base.bias, groups)
        if merged:
            x2 = x.reshape(-1, x.shape[-1])
            y2 = y.reshape(-1, y.shape[-1])
            for m in merged:  # grouped by merged adapter, one GEMM each
                w, b = m.weights[path]
                y2 = y2.index_copy(0, m.rows, F.linear(x2.index_select(0, m.rows), w, b))
            y = y2.reshape(y.shape)
        return y


def _fused_plan(base: nn.Linear, groups: list[Group]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``batched_linear``'s work for groups whose every hook has a fused kernel, in its order and
    without its per-call dispatch: the input-side kernels on a copy of the rows, the base GEMM
    (with the bias unless an output-side transform follows), the output-side kernels, the deltas.
    Rows the kernels do not take (autograd, another dtype or device) go through ``batched_linear``."""
    weight, bias = base.weight, base.bias
    pres = [(g.fused["pre"], g) for g in groups if "pre" in g.hooks]
    posts = [(g.fused["post"], g) for g in groups if "post" in g.hooks]
    deltas = [(g.fused["delta"], g) for g in groups if "delta" in g.hooks]
    gemm_bias = None if posts else bias

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not fusable(x2):
            return batched_linear(x, weight, bias, groups)
        xin = x2.clone() if pres else x2
        for f, g in pres:
            f(xin, x2, g)
        y = F.linear(xin, weight, gemm_bias)
        for f, g in posts:
            f(y, x2, g)
        for f, g in deltas:
            f(y, x2, g)
        if posts and bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    return run


@dataclass
class TrainBinding(StepBinding):
    """A training step: one adapter on every row, parameters with autograd."""

    method: AdapterMethod
    config: MethodConfig
    params: dict[str, dict[str, torch.Tensor]]  # path -> name -> tensor (requires_grad)

    def apply(self, path: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        p = self.params.get(path)
        if p is None:
            return base(x)
        return adapted_forward(self.method, self.config, p, x, base.weight, base.bias)


_BINDING: ContextVar[StepBinding | None] = ContextVar("facet_step_binding", default=None)


@contextlib.contextmanager
def bind(binding: StepBinding | None):
    token = _BINDING.set(binding)
    try:
        yield
    finally:
        _BINDING.reset(token)


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight of projections (dtype checks)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # only base-only static decode steps are compiled
            return self.base(x)  # (paged/static.py); a graph cannot read the context variable
        binding = _BINDING.get()
        if binding is None:
            return self.base(x)
        return binding.apply(self.path, x, self.base)

    def extra_repr(self) -> str:
        return f"path={self.path}"


def wrap_linears(model: nn.Module, target_modules: list[str]) -> dict[str, AdaptedLinear]:
    """Replace every ``nn.Linear`` whose name matches a target suffix. Returns path -> wrapper."""
    from server.methods import matches_target

    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and matches_target(name, target_modules)
    ]
    wrapped = {}
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = AdaptedLinear(mod, name)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    if not wrapped:
        raise ValueError(f"no linear layer of the model matches target modules {target_modules}")
    return wrapped
