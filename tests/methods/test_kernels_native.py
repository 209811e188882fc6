"""One native call per projection (``Projection``, server/kernels/plan_cpu.cpp) against the same
kernels called one by one from Python (``adapted_linear._fused_plan``).

Both run the same kernels and ATen ops in the same order, so the outputs are equal bit for bit,
in float32 and bfloat16; the Python path itself is checked against the families' torch code in
test_kernels.py and test_kernels_bf16.py. Also: several families' groups in one projection, the
shared input spectra never answering for another input, and the rows the kernels do not take
(autograd, a strided input) served by the torch code.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.adapted_linear import ServeBinding, _fused_plan
from server.kernels.fast import fast_op
from server.methods import Group, batched_linear

from .cases import CASE_IDS, CASES
from .test_kernels import _groups
from .test_kernels_bf16 import KERNEL_CASES, KERNEL_IDS

SHAPES = [(24, 24), (8, 24), (21, 15), (15, 21)]


def _group(k, case, out_f, in_f, dtype, rows=None, slots=None, seed=0) -> Group | None:
    """``test_kernels``' group of 5 random adapters of ``case`` (its rows and slots unless given),
    tables in ``dtype``, with every hook's kernel; or None (the config does not fit the shape, or
    some hook has no kernel: such projections never take the lean path)."""
    gen = torch.Generator().manual_seed(seed)
    made = _groups(case, out_f, in_f, torch.randn(out_f, in_f, generator=gen) / in_f**0.5, seed=seed)
    if made is None:
        return None
    g = made[1][0]
    g.table = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in g.table.items()}
    g.rows = g.rows if rows is None else rows
    g.slots = g.slots if slots is None else slots
    g.fused = {h: f for h in g.hooks if (f := fast_op(k, g.method, g.sig, h)) is not None}
    return g if g.fused and set(g.fused) == set(g.hooks) else None


def _linear(out_f, in_f, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) / in_f**0.5)
        lin.bias.copy_(torch.randn(out_f, generator=gen))
    return lin.to(dtype).requires_grad_(False)


def _native(k, path, base, groups):
    run = ServeBinding(kernels=k)._native_plan(path, base, groups)
    assert run is not None, "every group here has a native op"
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_native_projection_equals_the_python_lean_path(k, case, shape, dtype):
    out_f, in_f = shape
    g = _group(k, case, out_f, in_f, dtype)
    if g is None:
        pytest.skip("no lean path for this config and shape")
    base = _linear(out_f, in_f, dtype)
    x = torch.randn(2, 7, in_f).to(dtype)
    with torch.inference_mode():
        want = _fused_plan(base, [g])(x)
        got = _native(k, "layers.0.mlp.up_proj", base, [g])(x)
    assert got.shape == (2, 7, out_f) and got.dtype == dtype
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.nn.functional.linear(x, base.weight, base.bias)), (
        "adapters changed rows"
    )


def test_several_families_in_one_projection_equal_the_python_lean_path(k):
    """Pools of HUT (pre and post), ETHER+ (pre and post), LoRA, DCT and SURM in one projection, on
    disjoint rows, as the engine builds them."""
    by_id = dict(zip(CASE_IDS, CASES, strict=True))
    chosen = ["hut-r1", "etherplus-both-4", "lora-r4", "dct-n20", "surm-circulant", "surm-kronecker-4"]
    groups = []
    for i, cid in enumerate(chosen):
        rows = torch.tensor([i, i + 6, i + 12])
        g = _group(k, by_id[cid], 24, 24, torch.float32, rows=rows, slots=torch.tensor([1, 0, 1]), seed=i)
        assert g is not None, cid
        groups.append(g)
    base = _linear(24, 24, torch.float32)
    x = torch.randn(18, 24)
    with torch.inference_mode():
        want = _fused_plan(base, groups)(x)
        got = _native(k, "layers.0.self_attn.q_proj", base, groups)(x)
        plain = batched_linear(x, base.weight, base.bias, groups)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cid", ["dct-n20", "surm-circulant", "surm-toeplitz"])
def test_shared_spectra_answer_only_for_the_same_input(k, cid):
    """q and k read one input and share its spectrum; o_proj's input has the same shape and rows but
    other values: it must not be served the cached spectrum, nor may q's next input."""
    case = dict(zip(CASE_IDS, CASES, strict=True))[cid]
    binding = ServeBinding(kernels=k)
    x, other = torch.randn(14, 24), torch.randn(14, 24)
    runs = []
    for i, path in enumerate(["l.0.attn.q_proj", "l.0.attn.k_proj", "l.0.attn.o_proj", "l.0.attn.q_proj"]):
        g = _group(k, case, 24, 24, torch.float32, seed=i)
        g.rows = runs[0][1][0].rows if runs else g.rows  # one pool: the same rows object, as in the engine
        base = _linear(24, 24, torch.float32, seed=i)
        runs.append((binding._native_plan(path, base, [g]), [g], base))
    with torch.inference_mode():
        for (run, groups, base), inp in zip(runs, [x, x, other, torch.randn(14, 24)], strict=True):
            want = batched_linear(inp, base.weight, base.bias, groups)
            torch.testing.assert_close(run(inp), want, rtol=1e-5, atol=1e-5)


def test_rows_the_kernels_do_not_take_go_through_the_torch_code(k):
    """With autograd on, or a strided input, ``Projection.run`` answers None and the torch code
    serves the rows: same result, and gradients flow."""
    g = _group(k, dict(zip(CASE_IDS, CASES, strict=True))["lora-r4"], 24, 24, torch.float32)
    base = _linear(24, 24, torch.float32)
    run = _native(k, "layers.0.mlp.up_proj", base, [g])
    x = torch.randn(14, 24, requires_grad=True)
    with torch.enable_grad():
        y = run(x)
        y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    strided = torch.randn(24, 14).T  # [14, 24], not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(run(strided), batched_linear(strided, base.weight, base.bias, [g]))


def test_a_native_op_is_the_python_kernel_call(k):
    g = _group(k, dict(zip(CASE_IDS, CASES, strict=True))["hut-r1"], 24, 24, torch.float32)
    from server.kernels.fast import native_op

    op = native_op(k, g.method, g.sig, "pre", g, k.Spectra())
    assert op.name == "scale_rows_"
    z1 = torch.randn(14, 24)
    z2, before = z1.clone(), z1.clone()
    op(z1, z1)
    g.fused["pre"](z2, z2, g)
    assert torch.equal(z1, z2) and not torch.equal(z1, before)


def test_a_bound_table_of_the_wrong_width_fails_the_call_not_the_process(k):
    """The kernels' own checks run on every native call: a LoRA ``A`` bound with the wrong input
    width raises a RuntimeError naming it when the projection runs."""
    g = _group(k, dict(zip(CASE_IDS, CASES, strict=True))["lora-r4"], 24, 24, torch.float32)
    g.table = {**g.table, "A": g.table["A"][:, :, :20].contiguous()}
    run = _native(k, "layers.0.mlp.up_proj", _linear(24, 24, torch.float32), [g])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="LoRA A"):
        run(torch.randn(14, 24))
