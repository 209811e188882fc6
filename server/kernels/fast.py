"""The glue between a step's groups and the fused CPU kernels.

Which hook of which signature has a kernel is each family's own answer (``AdapterMethod.fast_op``
in ``server/methods``): this module only holds what a step's kernels share. ``fast_op`` returns a
function doing the family's ``pre``, ``post`` or ``delta`` for one group *in place* on the step's
activations, or ``None``: the family's torch code then runs. The functions take
``(target, x, group)``: ``target`` is the tensor written (the pre-transformed input for ``pre``,
the base output for ``post`` and ``delta``), ``x`` the step's original input rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from server.methods import AdapterMethod
from server.methods.base import FastOp


class SharedSpectra:
    """Input spectra of one step's rows, shared by sibling projections (q/k/v, gate/up).

    Siblings are projections under one parent module (``...self_attn``, ``...mlp``) reading the
    same activations: the same memory (data pointer, shape and strides). An entry keeps its input
    alive, so that memory cannot be reused for another tensor while the entry exists; each new
    input replaces the entry of its kind, so at most one input per kind and pool is held.
    """

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    def get(self, kind: tuple, scope: str, x: torch.Tensor, rows: torch.Tensor, compute) -> torch.Tensor:
        key = (kind, id(rows))
        ident = (scope, x.data_ptr(), tuple(x.shape), x.stride())
        hit = self._entries.get(key)
        if hit is not None and hit[0] == ident and hit[2] is rows:
            return hit[3]
        spec = compute()
        self._entries[key] = (ident, x, rows, spec)
        return spec


@dataclass(frozen=True)
class SharedInputs:
    """What a family's kernel may share with its siblings: ``spectra``, within ``scope`` (the parent
    module path of the projection)."""

    spectra: SharedSpectra = field(default_factory=SharedSpectra)
    scope: str = ""

    def spectrum(
        self, kind: tuple, x: torch.Tensor, rows: torch.Tensor, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        return self.spectra.get(kind, self.scope, x, rows, compute)


@dataclass(frozen=True)
class NativeShared:
    """What a family's native op may share with its siblings: the binding's ``spectra`` (the
    compiled module's ``Spectra``, the twin of ``SharedSpectra``), within ``scope``."""

    spectra: object
    scope: str = ""


def native_op(k, method: AdapterMethod, sig: Hashable, hook: str, group, spectra, scope: str = ""):
    """The family's kernel for ``hook`` bound to ``group`` (a ``NativeOp`` of the compiled module),
    or None: no native plans in this module (an older build, a benchmark's wrapper), rows not
    given as indices, or no kernel for this hook (the family's ``fast_op`` says which, so its
    ``native_op`` is only asked for hooks that have one)."""
    if k is None or not hasattr(k, "Projection") or group.rows is None or group.slots is None:
        return None
    if fast_op(k, method, sig, hook, rows=group.rows.numel()) is None:
        return None
    return method.native_op(k, sig, hook, group, NativeShared(spectra, scope))


def fast_op(
    k,
    method: AdapterMethod,
    sig: Hashable,
    hook: str,
    spectra: SharedSpectra | None = None,
    scope: str = "",
    rows: int | None = None,
) -> FastOp | None:
    """The fused in-place op for one group's hook, or None (no kernels built, none for this
    signature, or the group's ``rows`` past the family's ``kernel_max_rows``; None: not checked).
    ``spectra``/``scope``: where input spectra are shared, and the parent module path of the
    projection (siblings share it)."""
    if k is None:
        return None
    limit = method.kernel_max_rows(sig, hook)
    if rows is not None and limit is not None and rows > limit:
        return None
    return method.fast_op(
        k, sig, hook, SharedInputs(spectra if spectra is not None else SharedSpectra(), scope)
    )
