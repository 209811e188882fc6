"""Which adapter work has a fused CPU kernel, and the glue that calls it.

``fast_op(kernels, method_name, sig, hook)`` returns a function doing the family's ``pre``,
``post`` or ``delta`` for one group *in place* on the step's activations, or ``None``: the
family's torch code in ``server/methods`` then runs (HUT rank > 1, which the policy serves
merged anyway). The functions take ``(target, x, group)``: ``target`` is the tensor written (the
pre-transformed input for ``pre``, the base output for ``post`` and ``delta``), ``x`` the step's
original input rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import lru_cache

import torch

from server.methods import dct as dct_module
from server.methods import surm as surm_module

FastOp = Callable[[torch.Tensor, torch.Tensor, object], None]


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


@lru_cache(maxsize=64)
def _dct_plan(in_f: int, out_f: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    p_in = dct_module._plan(in_f, device, torch.float32)
    p_out = dct_module._plan(out_f, device, torch.float32)
    return (
        p_in.perm.contiguous(),
        torch.view_as_real(p_in.fwd).contiguous(),
        torch.view_as_real(p_out.inv).contiguous(),
        p_out.unperm.contiguous(),
    )


def fast_op(
    k, method_name: str, sig: Hashable, hook: str, spectra: SharedSpectra | None = None, scope: str = ""
) -> FastOp | None:
    """The fused in-place op for one group's hook, or None. ``spectra``/``scope``: where input
    spectra are shared, and the parent module path of the projection (siblings share it)."""
    if k is None:
        return None
    spectra = spectra if spectra is not None else SharedSpectra()
    if method_name == "hut" and sig[1] == 1:
        if hook == "pre":
            return lambda z, x, g: k.scale_rows_(z, g.rows, g.slots, g.table["pre"])
        if hook == "post":
            return lambda y, x, g: k.scale_shift_rows_(y, g.rows, g.slots, g.table["post"])
    elif method_name == "ether":
        side = {"pre": "in", "post": "out"}.get(hook)
        if side in sig[1]:
            return lambda z, x, g: k.reflect_rows_(z, g.rows, g.slots, g.table[side])
    elif method_name == "lora" and hook == "delta":
        return lambda y, x, g: k.lora_add_(y, x, g.rows, g.slots, g.table["A"], g.table["Bt"])
    elif method_name == "surm" and hook == "delta":
        variant, out_f, in_f, f = sig
        n = max(out_f, in_f)
        if variant == "circulant":

            def circulant(y, x, g):
                spec = spectra.get(("rfft", n), scope, x, g.rows, lambda: k.rfft_rows(x, g.rows, n))
                k.circulant_apply_(y, spec, g.rows, g.slots, g.table["spec"], n)

            return circulant
        if variant == "toeplitz":
            length = surm_module._toeplitz_len(n)

            def toeplitz(y, x, g):
                spec = spectra.get(("rfft", length), scope, x, g.rows, lambda: k.rfft_rows(x, g.rows, length))
                k.toeplitz_apply_(y, spec, g.rows, g.slots, g.table["spec"], n, length)

            return toeplitz
        return lambda y, x, g: k.kronecker_add_(y, x, g.rows, g.slots, g.table["AB"], f)
    elif method_name == "dct" and hook == "delta":
        _, out_f, in_f, _ = sig

        def dct(y, x, g):
            perm, fwd, inv, unperm = _dct_plan(in_f, out_f, x.device)
            spec = spectra.get(("dct", in_f), scope, x, g.rows, lambda: k.dct_spectrum(x, g.rows, perm, fwd))
            k.dct_apply_(y, spec, g.rows, g.slots, g.table["pos"], g.table["coef"], inv, unperm)

        return dct
    return None
