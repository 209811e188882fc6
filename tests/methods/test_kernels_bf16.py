"""The fused CPU kernels (server/kernels) in bfloat16, against the families' bf16 torch code.

The kernels widen every bf16 value to float32, compute and accumulate in float32 and round each
result once; the torch code rounds its intermediates as well. Neither is exact, so both are held
to the float64 product of the *same* bf16 inputs (activations, weight, slot tables, as the
residency stores them): each is within a few bf16 roundings (half an eps each) of values of the
size of the row's ``S = |x| · |W|ᵀ + |exact|`` (the inputs of the shared GEMM and its output are
of that size; an orthogonal or diagonal transform keeps it) plus the float32 accumulation's
``K · eps32 · S`` over the reduction length ``K``. The adapters' effect is checked to stand well
above that bound, so the test can tell a served adapter (or the right slot) from a wrong one.

The kernels are plain C++ the compiler vectorises for the machine, so a CPU without AVX-512-BF16
runs the same source, except LoRA's bf16 block, which has a hand-vectorised AVX-512-BF16 path
where the build has those instructions; ``test_kernels_fast_paths.py`` holds it and the portable code
to the same bound on one machine.
"""

from __future__ import annotations

import pytest
import torch

from server.kernels.fast import fast_op
from server.methods import Group, batched_linear, get_method, stack_prepared

from .cases import CASES

EPS16 = torch.finfo(torch.bfloat16).eps
EPS32 = torch.finfo(torch.float32).eps
# The roundings on the way to an output, half an eps each: an intermediate (an input-side transform's
# result, or the delta), the GEMM's output, and the output-side transform or the sum.
ROUNDINGS = 3
SHAPES = [(24, 24), (8, 24), (48, 24), (24, 48), (21, 15), (15, 21)]
N_ROWS = 14


def _has_kernel(case) -> bool:
    """Whether some hook of ``case`` has a kernel (asking needs no built module: ``fast_op`` only
    names the kernels it will call)."""
    method = get_method(case.family)
    sig = method.signature(method.parse_config(case.raw_config()), 24, 24)
    return any(method.fast_op(object(), sig, h, None) is not None for h in method.hooks(sig))


KERNEL_CASES = [c for c in CASES if _has_kernel(c)]
KERNEL_IDS = [c.id for c in KERNEL_CASES]


def _bf16_group(case, out_f, in_f, w16, n_slots=5, seed=0, rows=None, slots=None):
    """One group of ``case`` with ``n_slots`` random adapters, tables prepared in float32 from the
    bf16 weight and stored in bf16 (as ``residency._prepare`` does). None if the shape does not fit."""
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    try:
        cfg.check_shape("m", out_f, in_f)
        method.param_specs(cfg, out_f, in_f)
    except Exception:
        return None
    g = torch.Generator().manual_seed(seed)
    w32 = w16.float()
    prepared = []
    for _ in range(n_slots):
        out = method.prepare(cfg, method.init_params(cfg, w32, "random", g), w32)
        prepared.append(
            {n: (t.bfloat16() if t.is_floating_point() else t).contiguous() for n, t in out.items()}
        )
    rows = torch.tensor([0, 2, 3, 7, 8, 11, 12]) if rows is None else rows  # gaps between the rows
    slots = torch.tensor([4, 0, 4, 2, 1, 0, 3]) if slots is None else slots  # repeated, unordered
    sig = method.signature(cfg, out_f, in_f)
    return Group(method, sig, stack_prepared(prepared), rows, slots)


def _fused(k, g: Group) -> Group:
    fused = Group(g.method, g.sig, g.table, g.rows, g.slots)
    fused.fused = {h: f for h in fused.hooks if (f := fast_op(k, g.method, g.sig, h)) is not None}
    assert fused.fused, "every case has at least one kernel hook or is skipped by the caller"
    return fused


def _as64(g: Group) -> Group:
    table = {n: (t.double() if t.is_floating_point() else t) for n, t in g.table.items()}
    return Group(g.method, g.sig, table, g.rows, g.slots)


def _check(k, case, g, x16, w16, b16):
    """The kernels' and the torch code's bf16 outputs against the float64 result of the same inputs."""
    if not any(fast_op(k, g.method, g.sig, h) is not None for h in g.hooks):
        pytest.skip("served without a kernel (merged by policy, or torch code only)")
    with torch.inference_mode():
        fused = batched_linear(x16, w16, b16, [_fused(k, g)])
        plain = batched_linear(x16, w16, b16, [g])
        exact = batched_linear(x16.double(), w16.double(), b16.double(), [_as64(g)])
        base = torch.nn.functional.linear(x16.double(), w16.double(), b16.double())
    assert fused.dtype == torch.bfloat16
    out_f, in_f = w16.shape
    reduction = max(in_f, out_f)  # the GEMM's, a transform's or an FFT's length
    bound = ROUNDINGS * EPS16 / 2 + reduction * EPS32
    scale = (x16.double().abs() @ w16.double().abs().T + exact.abs()).amax(-1, keepdim=True)  # [R, 1]
    scale = scale + b16.double().abs().max()
    for what, got in (("kernels", fused), ("torch code", plain)):
        err = (got.double() - exact).abs() / scale
        assert float(err.max()) <= bound, f"{case.id}: {what} off by {float(err.max()):.3g} > {bound:.3g}"
    err = float(((fused.double() - plain.double()).abs() / scale).max())
    assert err <= 2 * bound, f"{case.id}: kernels vs torch code {err:.3g} > {2 * bound:.3g}"
    adapted = torch.zeros(x16.shape[0], dtype=torch.bool)
    adapted[g.rows] = True
    effect = float(((exact - base).abs() / scale)[adapted].max())
    assert effect > 2 * bound, f"{case.id}: the adapter's effect {effect:.3g} is within the bound {bound:.3g}"
    # Rows of no group are the base GEMM's output, untouched.
    assert torch.equal(fused[~adapted], plain[~adapted])


@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_bf16_kernel_matches_bf16_torch_code(k, case, shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    w16 = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).bfloat16()
    b16 = torch.randn(out_f, generator=g).bfloat16()
    group = _bf16_group(case, out_f, in_f, w16)
    if group is None:
        pytest.skip("config does not fit this shape")
    x16 = torch.randn(N_ROWS, in_f, generator=g).bfloat16()
    _check(k, case, group, x16, w16, b16)


# 65 rows: one past the FFT kernels' 64-row chunk; 401: several chunks, and LoRA's slot blocks of
# up to 4 rows split over the threads.
@pytest.mark.parametrize("n_rows", [65, 401])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_bf16_many_rows_over_chunks_and_threads(k, two_threads, case, n_rows):
    out_f, in_f = 21, 24
    if case.family in ("ether", "c3a") or case.id == "surm-kronecker-4":
        out_f = 24  # block and factor sizes must divide both widths
    g = torch.Generator().manual_seed(n_rows)
    w16 = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).bfloat16()
    b16 = torch.randn(out_f, generator=g).bfloat16()
    total = n_rows + 37
    rows = torch.randperm(total, generator=g)[:n_rows]  # unordered, 37 rows without adapter
    slots = torch.randint(0, 5, (n_rows,), generator=g)
    group = _bf16_group(case, out_f, in_f, w16, rows=rows, slots=slots)
    assert group is not None, "every case fits this shape"
    _check(k, case, group, torch.randn(total, in_f, generator=g).bfloat16(), w16, b16)


def test_bf16_results_are_rounded_as_torch_rounds(k):
    """A kernel's bf16 write-back is round-to-nearest-even of the float32 result, as torch's own
    bf16 ops: HUT's input scale (one product per element) matches torch bit for bit, halfway cases
    and infinities included; NaN stays NaN (its payload bits are not compared)."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 64, generator=g).bfloat16()
    z[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    t = torch.randn(3, 64, generator=g).bfloat16()
    t[1, :8] = 1.0 + 2.0**-7  # 1 + one bf16 ulp: the exact product often lies halfway
    rows, slots = torch.tensor([0, 1, 3, 5]), torch.tensor([1, 1, 0, 2])
    want = z.clone()
    want[rows] = z[rows] * t[slots]
    got = z.clone()
    k.scale_rows_(got, rows, slots, t)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_mixed_dtypes_are_refused(k):
    """x and y of different dtypes (a caller's bug) raise instead of being read as the wrong type."""
    y = torch.randn(4, 16).bfloat16()
    x = torch.randn(4, 24)
    a, bt = torch.randn(2, 4, 24).bfloat16(), torch.randn(2, 4, 16).bfloat16()
    with pytest.raises(RuntimeError, match="same dtype"):
        k.lora_add_(y, x, torch.tensor([0]), torch.tensor([1]), a, bt)
    with pytest.raises(RuntimeError, match="LoRA Bt"):
        k.lora_add_(y, x.bfloat16(), torch.tensor([0]), torch.tensor([1]), a, bt.float())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        k.scale_rows_(y.half(), torch.tensor([0]), torch.tensor([0]), torch.randn(2, 16))
