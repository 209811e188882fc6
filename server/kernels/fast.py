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


def fast_op(kernels, method_name: str, sig: Hashable, hook: str) -> FastOp | None:
    if kernels is None:
        return None
    return _lookup(kernels, method_name, sig, hook)


@lru_cache(maxsize=1024)
def _lookup(k, method_name: str, sig: Hashable, hook: str) -> FastOp | None:
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
            return lambda y, x, g: k.circulant_add_(y, x, g.rows, g.slots, g.table["spec"], n)
        if variant == "toeplitz":
            length = surm_module._toeplitz_len(n)
            return lambda y, x, g: k.toeplitz_add_(y, x, g.rows, g.slots, g.table["spec"], n, length)
        return lambda y, x, g: k.kronecker_add_(y, x, g.rows, g.slots, g.table["AB"], f)
    elif method_name == "dct" and hook == "delta":
        _, out_f, in_f, _ = sig

        def dct(y, x, g):
            plan = _dct_plan(in_f, out_f, x.device)
            k.dct_add_(y, x, g.rows, g.slots, g.table["pos"], g.table["coef"], *plan)

        return dct
    return None
