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
from server.kernels.fast import fast_op, native_op
from server.methods import Group, batched_linear

from .cases import CASE_IDS, CASES
from .test_kernels import _groups
from .test_kernels_bf16 import KERNEL_CASES, KERNEL_IDS

SHAPES = [(24, 24), (8, 24), (21, 15), (15, 21)]
HOOKS = ("pre", "post", "delta")
EPS16 = torch.finfo(torch.bfloat16).eps


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


MIXED = ["hut-r1", "etherplus-both-4", "lora-r4", "dct-n20", "surm-circulant", "surm-kronecker-4"]
FFT_CASES = {"dct-n20", "surm-circulant", "surm-toeplitz"}


def _mixed_groups(k, dtype, chosen=MIXED, width=24, per_group=3):
    """One pool per case of ``chosen`` in one projection, on disjoint rows, as the engine builds
    them; returns the groups and each group's rows."""
    by_id = dict(zip(CASE_IDS, CASES, strict=True))
    n = len(chosen)
    groups = []
    for i, cid in enumerate(chosen):
        rows = torch.arange(per_group) * n + i
        slots = torch.arange(per_group) % 2
        g = _group(k, by_id[cid], width, width, dtype, rows=rows, slots=slots, seed=i)
        assert g is not None, cid
        groups.append(g)
    return groups


def test_several_families_in_one_projection_equal_the_python_lean_path(k):
    """Pools of HUT (pre and post), ETHER+ (pre and post), LoRA, DCT and SURM in one projection, on
    disjoint rows, as the engine builds them; the ops on the calling thread, in the Python path's
    order (the lanes on threads: the next test)."""
    groups = _mixed_groups(k, torch.float32)
    base = _linear(24, 24, torch.float32)
    x = torch.randn(18, 24)
    before = k.set_kernel_threads_(False)
    try:
        with torch.inference_mode():
            want = _fused_plan(base, groups)(x)
            got = _native(k, "layers.0.self_attn.q_proj", base, groups)(x)
            plain = batched_linear(x, base.weight, base.bias, groups)
    finally:
        k.set_kernel_threads_(before)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def _on_and_off_threads(k, run, x) -> dict[bool, torch.Tensor]:
    """``run(x)`` with the kernels' threads switch on (True) and off (False)."""
    outs = {}
    with torch.inference_mode():
        for threads in (True, False):
            before = k.set_kernel_threads_(threads)
            try:
                outs[threads] = run(x)
            finally:
                k.set_kernel_threads_(before)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_projections_groups_on_two_threads_give_the_rows_of_one_thread(k, two_threads, dtype):
    """A projection's groups touch disjoint rows, so ``Projection`` runs them in lanes spread over
    the threads (plan_cpu.cpp, ``Lanes``): one lane per group on each side (a group's post op and
    delta op stay in one lane). Every row is computed by the same kernel either way: the loop
    kernels' rows are equal bit for bit, the FFT kernels' (an MKL plan per thread) to float32
    rounding."""
    chosen = [*MIXED, "surm-toeplitz", "hut-r1-scale-shift", "lora-r4-rslora"]
    groups = _mixed_groups(k, dtype, chosen, width=48, per_group=4)
    base = _linear(48, 48, dtype)
    x = torch.randn(4 * len(chosen), 48).to(dtype)
    run = _native(k, "layers.0.mlp.up_proj", base, groups)
    assert _projection(k, groups, base).spread[1], "the output side's lanes must spread here"
    outs = _on_and_off_threads(k, run, x)
    with torch.inference_mode():
        plain = torch.nn.functional.linear(x, base.weight, base.bias)
    tol = 1e-5 if dtype == torch.float32 else 2 * EPS16
    for cid, g in zip(chosen, groups, strict=True):
        on, off = outs[True][g.rows], outs[False][g.rows]
        assert not torch.equal(on, plain[g.rows]), f"{cid} changed nothing"
        if cid in FFT_CASES:
            torch.testing.assert_close(on, off, rtol=tol, atol=tol)
        else:
            assert torch.equal(on, off), cid


def _projection(k, groups, base):
    spectra = k.Spectra()
    ops = {h: [native_op(k, g.method, g.sig, h, g, spectra) for g in groups if h in g.hooks] for h in HOOKS}
    return k.Projection(base.weight, base.bias, ops["pre"], ops["post"], ops["delta"])


def _lanes(k, groups, base):
    return _projection(k, groups, base).lanes


def test_cheap_lanes_run_in_order_costly_ones_spread(k, two_threads):
    """Waking a second thread costs about what two row scalings of a few rows do, so lanes that
    would spare the calling thread little run in order on it; a side with more work spreads.
    Either way every row equals the one-thread result (to float32 rounding: the DCT group's FFTs
    use a plan per thread)."""
    by_id = dict(zip(CASE_IDS, CASES, strict=True))
    base = _linear(24, 24, torch.float32)

    def group(cid, rows, seed):
        rows = torch.tensor(rows)
        return _group(k, by_id[cid], 24, 24, torch.float32, rows=rows, slots=rows % 2, seed=seed)

    few = [group("hut-r1", [0, 1], 1), group("etherplus-both-4", [2, 3], 2), group("lora-r4", [4, 5], 3)]
    many = [
        group("hut-r1", list(range(0, 12)), 1),
        group("etherplus-both-4", list(range(12, 24)), 2),
        group("lora-r4", list(range(24, 36)), 3),
        group("dct-n20", list(range(36, 48)), 4),
    ]
    assert _projection(k, few, base).spread == (False, False)
    assert _projection(k, many, base).spread == (True, True)
    for groups, n in ((few, 6), (many, 48)):
        x = torch.randn(n, 24)
        run = _native(k, "layers.0.mlp.up_proj", base, groups)
        outs = _on_and_off_threads(k, run, x)
        torch.testing.assert_close(outs[True], outs[False], rtol=1e-6, atol=1e-6)
        plain = torch.nn.functional.linear(x, base.weight, base.bias)
        assert not torch.equal(outs[True], plain)


def test_lanes_join_the_ops_that_share_a_row(k):
    """Disjoint groups: a lane each (HUT and ETHER+ both sides have a pre op and a post op: one
    lane per side). Groups sharing a row (never built by the engine, but a binding could) join one
    lane, in their order, and then give the rows of the Python path exactly."""
    by_id = dict(zip(CASE_IDS, CASES, strict=True))
    base = _linear(24, 24, torch.float32)
    groups = _mixed_groups(k, torch.float32)
    assert _lanes(k, groups, base) == (2, len(MIXED))

    def group(cid, rows, seed):
        rows = torch.tensor(rows)
        return _group(k, by_id[cid], 24, 24, torch.float32, rows=rows, slots=rows % 2, seed=seed)

    a = group("lora-r4", [0, 1, 2], 1)
    b = group("lora-r4-rslora", [5, 2, 7], 2)
    c = group("surm-kronecker-4", [9, 10, 11], 3)
    d = group("surm-kronecker-4", [7, 12, 13], 4)
    e = group("lora-r4", [3, 4, 6], 5)
    assert _lanes(k, [a, c, b], base) == (0, 2), "b shares row 2 with a"
    assert _lanes(k, [a, c, d, e, b], base) == (0, 3), "b joins a's lane and d's"
    assert _lanes(k, [a, c, d, e, b, group("lora-r4", [11, 3, 0], 6)], base) == (0, 1)
    x = torch.randn(14, 24)
    with torch.inference_mode():
        want = _fused_plan(base, [a, c, d, e, b])(x)
        got = _native(k, "layers.0.mlp.up_proj", base, [a, c, d, e, b])(x)
    assert torch.equal(got, want)


def test_a_failing_op_on_a_lane_fails_the_call_not_the_process(k, two_threads):
    """One group's bad table among several: its kernel raises on whichever thread runs its lane,
    and the call raises it (the other lanes' rows are the caller's to discard)."""
    groups = _mixed_groups(k, torch.float32)
    lora = groups[MIXED.index("lora-r4")]
    lora.table = {**lora.table, "A": lora.table["A"][:, :, :20].contiguous()}
    run = _native(k, "layers.0.mlp.up_proj", _linear(24, 24, torch.float32), groups)
    for _ in range(3):
        with torch.inference_mode(), pytest.raises(RuntimeError, match="LoRA A"):
            run(torch.randn(18, 24))


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


def test_buffers_reused_across_layers_and_steps_leave_every_output_intact(k):
    """A binding runs each projection once per decode step: the input copy for the input-side ops
    and the spectra are written into the previous call's buffers. Two layers' q and k (sharing
    the spectra) over three steps of new inputs: every output equals the torch code's, and the
    outputs kept from earlier steps are unchanged by the later ones."""
    groups = _mixed_groups(k, torch.float32, ["hut-r1", "etherplus-both-4", "dct-n20", "surm-circulant"])
    binding = ServeBinding(kernels=k)
    paths = [f"l.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]
    bases = {p: _linear(24, 24, torch.float32, seed=i) for i, p in enumerate(paths)}
    runs = {p: binding._native_plan(p, bases[p], groups) for p in paths}
    kept = []
    with torch.inference_mode():
        for _step in range(3):
            for layer in range(2):
                x = torch.randn(12, 24)
                for p in paths[2 * layer : 2 * layer + 2]:
                    got = runs[p](x)
                    want = batched_linear(x, bases[p].weight, bases[p].bias, groups)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    kept.append((got, got.clone()))
    assert all(torch.equal(got, copy) for got, copy in kept)


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
