"""The fused CPU kernels (server/kernels) against the families' torch code, on every case.

A mixed group of rows (gaps, repeated slots, rows of other groups in between) goes through
``batched_linear`` twice, with and without the kernels; the outputs must agree to float32
rounding. Odd sizes are included because the DCT's FFT reordering differs for odd lengths.
"""

from __future__ import annotations

import pytest
import torch

from server.kernels.fast import fast_op
from server.methods import Group, batched_linear, get_method, stack_prepared
from server.methods import dct as dct_module

from .cases import CASE_IDS, CASES

SHAPES = [(24, 24), (8, 24), (48, 24), (24, 48), (21, 15), (15, 21)]


def _fused(k, groups):
    for g in groups:
        g.fused = {h: f for h in g.hooks if (f := fast_op(k, g.method, g.sig, h)) is not None}
    return groups


def _groups(case, out_f, in_f, weight, n_slots=5, seed=0):
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    try:
        cfg.check_shape("m", out_f, in_f)
        method.param_specs(cfg, out_f, in_f)
    except Exception:
        return None
    g = torch.Generator().manual_seed(seed)
    table = stack_prepared(
        [method.prepare(cfg, method.init_params(cfg, weight, "random", g), weight) for _ in range(n_slots)]
    )
    sig = method.signature(cfg, out_f, in_f)
    rows = torch.tensor([0, 2, 3, 7, 8, 11, 12])  # gaps: rows 1, 4-6, 9, 10 have no adapter
    slots = torch.tensor([4, 0, 4, 2, 1, 0, 3])  # repeated and unordered slots
    return method, [Group(method, sig, table, rows, slots)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_kernel_matches_torch(k, case, shape):
    out_f, in_f = shape
    torch.manual_seed(1)
    weight = torch.randn(out_f, in_f) / in_f**0.5
    bias = torch.randn(out_f)
    made = _groups(case, out_f, in_f, weight)
    if made is None:
        pytest.skip("config does not fit this shape")
    method, groups = made
    x = torch.randn(2, 7, in_f)  # 14 rows
    with torch.inference_mode():
        plain = batched_linear(x, weight, bias, groups)
        fused = batched_linear(x, weight, bias, _fused(k, groups))
        base = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # The adapter changes the adapted rows and leaves the others exactly alone.
    flat_f, flat_b = fused.reshape(14, -1), base.reshape(14, -1)
    assert (flat_f[groups[0].rows] - flat_b[groups[0].rows]).abs().max() > 1e-4
    other = torch.tensor([1, 4, 5, 6, 9, 10, 13])
    assert torch.equal(flat_f[other], flat_b[other])


def test_every_cheap_default_family_has_a_kernel(k):
    """The families served on the fly by default are all fused (HUT r>1 is served merged)."""
    wanted = {
        "lora-r4": ["delta"],
        "hut-r1": ["pre", "post"],
        "ether-in-1": ["pre"],
        "etherplus-out-1": ["post"],
        "etherplus-both-4": ["pre", "post"],
        "dct-n20": ["delta"],
        "surm-circulant": ["delta"],
        "surm-toeplitz": ["delta"],
        "surm-kronecker-4": ["delta"],
        # PEFT types on a family's tables get the family's kernels (their own fast_op says so)
        "ia3-out": ["pre", "post"],
        "loha-r3": ["delta"],
        "vera-r4": ["delta"],
        "dora-r4": ["delta"],
    }
    for case in CASES:
        if case.id not in wanted:
            continue
        method = get_method(case.family)
        sig = method.signature(method.parse_config(case.raw_config()), 24, 24)
        for hook in wanted[case.id]:
            assert fast_op(k, method, sig, hook) is not None, (case.id, hook)


def test_bad_indices_raise_instead_of_reading_memory(k):
    z = torch.randn(4, 8)
    table = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="slot index out of range"):
        k.scale_rows_(z, torch.tensor([0]), torch.tensor([2]), table)
    with pytest.raises(RuntimeError, match="row index out of range"):
        k.scale_rows_(z, torch.tensor([4]), torch.tensor([0]), table)
    with pytest.raises(RuntimeError, match="float32"):
        k.scale_rows_(z.double(), torch.tensor([0]), torch.tensor([0]), table)


def test_training_and_other_dtypes_use_the_torch_code(k):
    """Autograd rows and non-float32 rows never reach the kernels (they write in place)."""
    case = next(c for c in CASES if c.id == "hut-r1")
    weight = torch.randn(24, 24)
    _, groups = _groups(case, 24, 24, weight)
    calls = []
    groups[0].fused = {h: (lambda *a, h=h: calls.append(h)) for h in groups[0].hooks}
    x = torch.randn(14, 24, requires_grad=True)
    batched_linear(x, weight, None, groups)
    with torch.inference_mode():
        batched_linear(x.detach().double(), weight.double(), None, groups)
    assert calls == []
    with torch.inference_mode():
        batched_linear(x.detach(), weight, None, groups)
    assert sorted(calls) == ["post", "pre"]


def test_build_command_of_make_model(k):
    """``python -m server.kernels`` (run by ``make model``) finds the build and exits 0."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "server.kernels"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_spectral_kernels_call_mkl_where_torch_carries_it(k):
    """fft_cpu.cpp runs MKL's DFTI on raw buffers where torch's build has MKL (its x86-64 wheels),
    torch's FFT otherwise (or with the fast paths off); both give torch's FFT results."""
    assert ("mkl_dfti" in k.fast_paths) == torch.backends.mkl.is_available()
    x = torch.randn(5, 30)
    rows = torch.tensor([4, 0, 2])
    for fast in (True, False):
        before = k.set_fast_paths_(fast)
        try:
            for n in (30, 31, 64):  # even, odd, zero-padded
                got = k.rfft_rows(x, rows, n)
                want = torch.view_as_real(torch.fft.rfft(x[rows], n))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        finally:
            k.set_fast_paths_(before)


@pytest.mark.parametrize("case_id", ["dct-n20", "surm-circulant", "surm-toeplitz"])
def test_sibling_projections_share_the_input_spectrum(k, case_id):
    """q/k/v read one activation tensor: its spectrum is computed once and each projection's
    result still equals the torch code; another input (o_proj's) gets its own spectrum."""
    from server.kernels.fast import SharedSpectra

    case = next(c for c in CASES if c.id == case_id)
    spectra, computed = SharedSpectra(), []
    real_get = spectra.get

    def counting_get(kind, scope, x, rows, compute):
        return real_get(kind, scope, x, rows, lambda: computed.append(kind) or compute())

    spectra.get = counting_get
    torch.manual_seed(3)
    x = torch.randn(14, 24)
    rows = None
    for i, (out_f, in_f) in enumerate([(24, 24), (8, 24), (8, 24)]):  # q, k, v
        weight = torch.randn(out_f, in_f) / in_f**0.5
        method, groups = _groups(case, out_f, in_f, weight, seed=i)
        rows = groups[0].rows if rows is None else rows
        groups[0].rows = rows  # one pool: the same rows object for every projection, as in the engine
        with torch.inference_mode():
            plain = batched_linear(x, weight, None, groups)
            for g in groups:
                g.fused = {"delta": fast_op(k, method, g.sig, "delta", spectra, "layers.0.self_attn")}
            fused = batched_linear(x, weight, None, groups)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert len(computed) == 1
    other = torch.randn(14, 24)  # o_proj's input: same shape, different tensor
    weight = torch.randn(24, 24) / 24**0.5
    method, groups = _groups(case, 24, 24, weight, seed=9)
    groups[0].rows = rows
    with torch.inference_mode():
        plain = batched_linear(other, weight, None, groups)
        groups[0].fused = {"delta": fast_op(k, method, groups[0].sig, "delta", spectra, "layers.0.self_attn")}
        torch.testing.assert_close(batched_linear(other, weight, None, groups), plain, rtol=1e-5, atol=1e-5)
    assert len(computed) == 2


# 1,401 rows: past every per-row kernel's grain (32768 / row cost: at most 1,366 rows here) and 22
# chunks of the FFT kernels' 64 rows with an odd remainder; 401: a few chunks, no thread split of
# the cheap kernels; 65: one row past a chunk.
@pytest.mark.parametrize("n_rows", [65, 401, 1401])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_many_rows_over_chunks_and_threads_match_torch(k, two_threads, case, n_rows):
    out_f, in_f = 21, 24  # odd output width: the DCT's odd-length reordering on the output side
    if case.family in ("ether", "c3a") or case.id == "surm-kronecker-4":
        out_f = 24  # block and factor sizes must divide both widths
    torch.manual_seed(5)
    weight = torch.randn(out_f, in_f) / in_f**0.5
    made = _groups(case, out_f, in_f, weight)
    assert made is not None, "every case fits this shape"
    method, groups = made
    g = torch.Generator().manual_seed(n_rows)
    total = n_rows + 37
    groups[0].rows = torch.randperm(total, generator=g)[:n_rows]  # unordered, 37 rows without adapter
    groups[0].slots = torch.randint(0, 5, (n_rows,), generator=g)
    x = torch.randn(total, in_f, generator=g)
    with torch.inference_mode():
        plain = batched_linear(x, weight, None, groups)
        fused = batched_linear(x, weight, None, _fused(k, groups))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def _width_calls(k):
    """(kernel name, call with one table of the wrong width, message fragment) for every table."""
    z, x, y = torch.randn(6, 24), torch.randn(6, 24), torch.randn(6, 16)
    rows, slots = torch.tensor([0, 3, 5]), torch.tensor([1, 0, 1])
    n, length = 24, 48
    spec_n = k.rfft_rows(x, rows, n)  # [3, 13, 2]
    spec_l = k.rfft_rows(x, rows, length)  # [3, 25, 2]
    perm, fwd, inv, unperm = dct_module.kernel_plan(24, 16, torch.device("cpu"))
    dct_spec = k.dct_spectrum(x, rows, perm, fwd)
    pos, coef = torch.zeros(2, 2, 8, dtype=torch.int32), torch.randn(2, 8)
    a, bt = torch.randn(2, 4, 24), torch.randn(2, 4, 16)
    return [
        ("scale_rows_", lambda: k.scale_rows_(z, rows, slots, torch.randn(2, 23)), "HUT input scales"),
        (
            "scale_shift_rows_",
            lambda: k.scale_shift_rows_(y, rows, slots, torch.randn(2, 2, 17)),
            "HUT output",
        ),
        (
            "scale_shift_rows_",
            lambda: k.scale_shift_rows_(y, rows, slots, torch.randn(2, 3, 16)),
            "HUT output",
        ),
        ("reflect_rows_", lambda: k.reflect_rows_(z, rows, slots, torch.randn(2, 4, 5)), "do not cover"),
        ("reflect_rows_", lambda: k.reflect_rows_(z, rows, slots, torch.randn(2, 3, 4, 6)), "ETHER table"),
        ("lora_add_", lambda: k.lora_add_(y, x, rows, slots, torch.randn(2, 4, 25), bt), "LoRA A"),
        ("lora_add_", lambda: k.lora_add_(y, x, rows, slots, a, torch.randn(2, 4, 15)), "LoRA Bt"),
        ("lora_add_", lambda: k.lora_add_(y, x, rows, slots, a, torch.randn(2, 3, 16)), "LoRA Bt"),
        ("lora_add_", lambda: k.lora_add_(y, x, rows, slots, a, torch.randn(3, 4, 16)), "LoRA Bt"),
        ("rfft_rows", lambda: k.rfft_rows(x, rows, 23), "shorter than the row"),
        (
            "circulant_apply_",
            lambda: k.circulant_apply_(y, spec_n, rows, slots, torch.randn(2, 12, 2), n),
            "circulant",
        ),
        (
            "circulant_apply_",
            lambda: k.circulant_apply_(y, spec_n, rows, slots, torch.randn(2, 13, 3), n),
            "circulant",
        ),
        (
            "circulant_apply_",
            lambda: k.circulant_apply_(y, spec_l, rows, slots, torch.randn(2, 13, 2), n),
            "match the rows",
        ),
        (
            "toeplitz_apply_",
            lambda: k.toeplitz_apply_(y, spec_l, rows, slots, torch.randn(2, 2, 24, 2), n, length),
            "toeplitz",
        ),
        (
            "toeplitz_apply_",
            lambda: k.toeplitz_apply_(y, spec_n, rows, slots, torch.randn(2, 2, 25, 2), n, length),
            "match the rows",
        ),
        ("kronecker_add_", lambda: k.kronecker_add_(y, x, rows, slots, torch.randn(2, 39), 4), "kronecker"),
        (
            "kronecker_add_",
            lambda: k.kronecker_add_(y, x, rows, slots, torch.randn(2, 40, 1), 4),
            "kronecker",
        ),
        ("kronecker_add_", lambda: k.kronecker_add_(y, x, rows, slots, torch.randn(2, 40), 5), "kronecker"),
        ("dct_spectrum", lambda: k.dct_spectrum(x, rows, perm[:-1], fwd), "dct plan"),
        ("dct_spectrum", lambda: k.dct_spectrum(x, rows, perm + 1, fwd), "permutation out of range"),
        ("dct_spectrum", lambda: k.dct_spectrum(x, rows, perm, fwd.double()), "dct plan"),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec, rows, slots, pos, torch.randn(2, 8, 1), inv, unperm),
            "dct coefficients",
        ),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec, rows, slots, pos[:, :, :7], coef, inv, unperm),
            "dct positions",
        ),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec, rows, slots, pos + 99, coef, inv, unperm),
            "dct position out of range",
        ),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec, rows, slots, pos, coef, inv[:-1], unperm),
            "dct plan",
        ),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec, rows, slots, pos, coef, inv, unperm - 1),
            "permutation out of range",
        ),
        (
            "dct_apply_",
            lambda: k.dct_apply_(y, dct_spec[:2], rows, slots, pos, coef, inv, unperm),
            "match the rows",
        ),
    ]


def test_every_table_width_is_checked_before_it_is_read(k):
    """A table of the wrong width raises a RuntimeError naming it (never reads past its memory);
    every kernel is covered. (test_kernel_matches_torch makes the same calls with the right ones.)"""
    calls = _width_calls(k)
    controls = {"set_fast_paths_", "fast_paths", "set_kernel_threads_"}  # switches and a list, no table
    # The native plans (op_* factories, Projection) call these same kernels, checks included, on
    # every run (test_kernels_native.py).
    native = {"NativeOp", "Projection", "Spectra"} | {n for n in dir(k) if n.startswith("op_")}
    assert {name for name, _, _ in calls} == {n for n in dir(k) if not n.startswith("_")} - controls - native
    for name, call, fragment in calls:
        with pytest.raises(RuntimeError) as e:
            call()
        assert fragment in str(e.value), (name, str(e.value).splitlines()[0])


@pytest.mark.parametrize("n_rows", [12, 13, 300])
def test_kronecker_groups_past_a_dozen_rows_go_to_the_torch_code(k, n_rows):
    """SURM Kronecker's kernel takes a decode step's few rows; larger groups (a prefill) get the
    torch code's batched products (``kernel_max_rows``, measured), in both plans."""
    from server.kernels.fast import native_op
    from server.methods import surm

    case = next(c for c in CASES if c.id == "surm-kronecker-4")
    out_f, in_f = 24, 48
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5
    method, groups = _groups(case, out_f, in_f, weight)
    g = groups[0]
    gen = torch.Generator().manual_seed(n_rows)
    g.rows = torch.randperm(n_rows + 5, generator=gen)[:n_rows]
    g.slots = torch.randint(0, 5, (n_rows,), generator=gen)
    x = torch.randn(n_rows + 5, in_f, generator=gen)
    small = n_rows <= surm.KRON_KERNEL_MAX_ROWS
    op = fast_op(k, method, g.sig, "delta", rows=n_rows)
    assert (op is not None) == small
    assert (native_op(k, method, g.sig, "delta", g, k.Spectra()) is not None) == small
    with torch.inference_mode():
        g.fused = {"delta": op} if op is not None else {}
        served = batched_linear(x, weight, None, [g])
        g.fused = {"delta": fast_op(k, method, g.sig, "delta")}  # no row count: the kernel
        kernel = batched_linear(x, weight, None, [g])
        g.fused = {}
        torch_code = batched_linear(x, weight, None, [g])
    assert torch.equal(served, kernel if small else torch_code)
    torch.testing.assert_close(kernel, torch_code, rtol=1e-5, atol=1e-5)  # both right either way
