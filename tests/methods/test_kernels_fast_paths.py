"""The kernels' fast paths (``fast_paths`` of the built module) and the portable code they replace,
on the same inputs and the same machine (``set_fast_paths_`` switches them).

LoRA's bf16 block kernel for AVX-512-BF16 (``server/kernels/lora_avx512.cpp``): a build without
those instructions has no such path and ``lora_add_`` runs the portable code whatever the switch
says; the checks below then hold it alone. (The other fast path, MKL's DFTI called directly by
the spectral kernels, is checked against torch's FFT in test_kernels.py, and every spectral
kernel against the torch code there and in test_kernels_bf16.py.) Either way
both settings of the switch are held to the float64 result of the same bf16 inputs within the
bound of ``test_kernels_bf16.py``: one bf16 rounding of the result and the float32 accumulation
over the reduction length, per value.
"""

from __future__ import annotations

import pytest
import torch

EPS16 = torch.finfo(torch.bfloat16).eps
EPS32 = torch.finfo(torch.float32).eps


def _lora_add(k, fast: bool, y, *args):
    before = k.set_fast_paths_(fast)
    try:
        out = y.clone()
        k.lora_add_(out, *args)
        return out
    finally:
        k.set_fast_paths_(before)


def _case(in_f, out_f, r, n_rows, seed):
    g = torch.Generator().manual_seed(seed)
    total, n_slots = n_rows + 5, 6
    x = torch.randn(total, in_f, generator=g).bfloat16()
    y = torch.randn(total, out_f, generator=g).bfloat16()
    a = torch.randn(n_slots, r, in_f, generator=g).bfloat16()
    bt = (torch.randn(n_slots, r, out_f, generator=g) / (r * in_f) ** 0.5).bfloat16()
    rows = torch.randperm(total, generator=g)[:n_rows]  # unordered; 5 rows of no adapter
    # slots repeated 1 to 6 times: blocks of 1-4 rows, and a slot split over two blocks
    slots = torch.tensor([i % n_slots for i in range(n_rows)])[torch.randperm(n_rows, generator=g)]
    return x, y, a, bt, rows, slots


# Widths on and off the 32 (input) and 16 (output) lanes of the vector path, the model's own
# shapes, ranks off its 4-row step, and row counts giving every block size.
SHAPES = [(15, 7), (32, 16), (33, 17), (64, 48), (576, 192), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("in_f,out_f", SHAPES, ids=[f"{i}to{o}" for i, o in SHAPES])
@pytest.mark.parametrize("r", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("n_rows", [1, 9, 23])
def test_lora_bf16_both_paths_match_the_exact_result(k, in_f, out_f, r, n_rows):
    x, y, a, bt, rows, slots = _case(in_f, out_f, r, n_rows, seed=in_f * 1000 + r * 10 + n_rows)
    x64, a64, bt64 = x.double(), a.double(), bt.double()
    exact = y.double().clone()
    exact[rows] += torch.einsum("ri,rji,rjo->ro", x64[rows], a64[slots], bt64[slots])
    # per element: the float32 accumulation over the values summed (|y| + |x| |A|ᵀ |Bt|), then
    # one rounding to bf16 (half an ulp of the value)
    summed = y.double().abs().clone()
    summed[rows] += torch.einsum("ri,rji,rjo->ro", x64[rows].abs(), a64[slots].abs(), bt64[slots].abs())
    accumulated = (in_f + r + 1) * EPS32 * summed
    bound = EPS16 / 2 * (exact.abs() + accumulated) + accumulated
    results = {fast: _lora_add(k, fast, y, x, rows, slots, a, bt) for fast in (True, False)}
    others = torch.ones(y.shape[0], dtype=torch.bool)
    others[rows] = False
    for fast, got in results.items():
        over = (got.double() - exact).abs() - bound
        assert float(over.max()) <= 0, f"fast={fast}: {int((over > 0).sum())} values outside the bound"
        assert torch.equal(got[others], y[others]), "rows of no adapter are left alone"
    # the adapter moves most of its rows' values by far more than the bound
    moved = ((exact - y.double()).abs() > 4 * bound)[rows]
    assert float(moved.double().mean()) > 0.5


def test_lora_bf16_rounds_like_the_portable_path(k):
    """Both paths round the float32 result to nearest even; infinities stay, NaN stays NaN."""
    x, y, a, bt, rows, slots = _case(64, 40, 4, 8, seed=3)
    bt.zero_()  # y + 0: the output is y's own bits, specials included
    y[rows[0], :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    on = _lora_add(k, True, y, x, rows, slots, a, bt)
    off = _lora_add(k, False, y, x, rows, slots, a, bt)
    nan = off.isnan()
    assert int(nan.sum()) == 1 and torch.equal(on.isnan(), nan)
    assert torch.equal(on.view(torch.int16)[~nan], off.view(torch.int16)[~nan])
    assert torch.equal(off.view(torch.int16)[~nan], y.view(torch.int16)[~nan])
    # a nonzero delta: halfway cases in the float32 sum round as the portable path rounds them
    bt2 = torch.full_like(bt, 2.0**-9)
    x2 = torch.ones_like(x)
    a2 = torch.full_like(a, 2.0**-6)
    on = _lora_add(k, True, y, x2, rows, slots, a2, bt2)
    off = _lora_add(k, False, y, x2, rows, slots, a2, bt2)
    assert torch.equal(on.isnan(), off.isnan())
    keep = ~off.isnan()
    assert torch.equal(on.view(torch.int16)[keep], off.view(torch.int16)[keep])


def test_the_switch_reports_and_restores(k):
    assert isinstance(k.fast_paths, tuple)
    before = k.set_fast_paths_(False)
    assert before is True
    assert k.set_fast_paths_(True) is False


@pytest.mark.parametrize("case_id", ["dct-n20", "surm-circulant", "surm-toeplitz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spectral_kernels_agree_with_direct_and_torch_ffts(k, case_id, dtype):
    """The spectral kernels with MKL's DFTI called directly (fast paths on) and with torch's FFT
    (off): the same transform code, so the results agree to float32 rounding."""
    from server.methods import batched_linear

    from .test_kernels import CASES, _fused, _groups

    case = next(c for c in CASES if c.id == case_id)
    torch.manual_seed(2)
    weight = torch.randn(24, 48) / 48**0.5
    method, groups = _groups(case, 24, 48, weight)
    groups = _fused(k, groups)
    x = torch.randn(2, 7, 48)
    outs = {}
    with torch.inference_mode():
        for fast in (True, False):
            before = k.set_fast_paths_(fast)
            try:
                outs[fast] = batched_linear(x.to(dtype), weight.to(dtype), None, groups).float()
            finally:
                k.set_fast_paths_(before)
        base = torch.nn.functional.linear(x.to(dtype), weight.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)
    assert float((outs[True] - base).abs().max()) > 1e-3, "the adapter changes the output"


# A prefill's rows over two threads (the module is built with OpenMP; ``set_kernel_threads_`` puts
# every kernel on the calling thread): each row is computed alone by the same code, so the loop
# kernels give the same bits; the FFT kernels run one MKL plan per thread, equal to float32 rounding.
@pytest.mark.parametrize(
    "case_id",
    [
        "lora-r4",
        "hut-r1-scale-shift",
        "etherplus-both-4",
        "surm-kronecker-4",
        "dct-n20",
        "surm-circulant",
        "surm-toeplitz",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_give_the_same_rows_on_one_thread_and_on_two(k, two_threads, case_id, dtype):
    from server.methods import batched_linear

    from .test_kernels import CASES, _fused, _groups

    case = next(c for c in CASES if c.id == case_id)
    out_f, in_f, n_rows = (
        192,
        576,
        300,
    )  # past every kernel's grain at these widths (rows, LoRA blocks, chunks)
    torch.manual_seed(4)
    weight = torch.randn(out_f, in_f) / in_f**0.5
    method, groups = _groups(case, out_f, in_f, weight)
    g = torch.Generator().manual_seed(7)
    groups[0].rows = torch.randperm(n_rows + 20, generator=g)[:n_rows]
    groups[0].slots = torch.randint(0, 5, (n_rows,), generator=g)
    groups = _fused(k, groups)
    x = torch.randn(n_rows + 20, in_f, generator=g).to(dtype)
    outs = {}
    with torch.inference_mode():
        for threads in (True, False):
            before = k.set_kernel_threads_(threads)
            try:
                outs[threads] = batched_linear(x, weight.to(dtype), None, groups)
            finally:
                k.set_kernel_threads_(before)
        base = torch.nn.functional.linear(x, weight.to(dtype))
    if case_id in ("dct-n20", "surm-circulant", "surm-toeplitz"):  # the FFT kernels
        tol = 1e-5 if dtype == torch.float32 else 2 * EPS16
        torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)
    else:
        assert torch.equal(outs[True], outs[False])
    assert float((outs[True].float() - base.float()).abs().max()) > 1e-3, "the adapter changes the output"


def test_the_threads_switch_reports_and_restores(k):
    assert k.set_kernel_threads_(False) is True
    assert k.set_kernel_threads_(True) is False


# SURM Kronecker at the factors its kernel unrolls (16, 32, 64; any other f runs the plain loops):
# output blocks (out / f) on and off its 4-block step, against the float64 result.
KRON = [(16, 48, 80), (32, 64, 96), (32, 576, 1536), (32, 1536, 576), (64, 128, 320), (8, 24, 40)]


@pytest.mark.parametrize("f,in_f,out_f", KRON, ids=[f"f{f}-{i}to{o}" for f, i, o in KRON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kronecker_matches_the_exact_result_at_every_factor(k, f, in_f, out_f, dtype):
    g = torch.Generator().manual_seed(f * 7 + in_f)
    n_slots, total = 3, 9
    x = torch.randn(total, in_f, generator=g).to(dtype)
    y = torch.randn(total, out_f, generator=g).to(dtype)
    ab = (torch.randn(n_slots, in_f + out_f, generator=g) / f**0.5).to(dtype)
    rows, slots = torch.tensor([7, 0, 3, 5, 8]), torch.tensor([2, 0, 1, 2, 0])
    got = y.clone()
    k.kronecker_add_(got, x, rows, slots, ab, f)

    def update(xs, tables):  # [n, in], [n, in + out] -> [n, out]: B (X Aᵀ), flattened
        a = tables[:, :in_f].reshape(-1, f, in_f // f)
        b = tables[:, in_f:].reshape(-1, out_f // f, f)
        return (b @ (xs.reshape(-1, f, in_f // f) @ a.transpose(1, 2))).reshape(-1, out_f)

    exact, summed = y.double().clone(), y.double().abs().clone()
    exact[rows] += update(x.double()[rows], ab.double()[slots])
    summed[rows] += update(x.double().abs()[rows], ab.double().abs()[slots])
    accumulated = (in_f // f + f + 1) * EPS32 * summed
    bound = torch.finfo(dtype).eps / 2 * (exact.abs() + accumulated) + accumulated
    assert float(((got.double() - exact).abs() - bound).max()) <= 0
    others = torch.ones(total, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(got[others], y[others])
    assert float((got.double() - y.double()).abs().max()) > 0.1, "the update changed the rows"
