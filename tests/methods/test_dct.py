"""sDCTFT (peft_type "DCT"): transforms, selection rule, position checks, config errors, padding."""

from __future__ import annotations

import math

import pytest
import torch

from server.methods import ConfigError, Group, WeightsError, adapted_forward, batched_linear, get_method
from server.methods.batched import stack_prepared
from server.methods.dct import band_index, band_quotas, dct_rows, idct_rows, select_positions

M = get_method("dct")


def _cfg(**kw):
    return M.parse_config({"peft_type": "DCT", "target_modules": ["q_proj"], **kw})


def _cosine(n: int) -> torch.Tensor:
    """The DCT-II matrix straight from the formula (independent of the module's FFT code)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    scale = torch.full((n, 1), math.sqrt(2 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1 / n)
    return scale * torch.cos(math.pi * (m + 0.5) * k / n)


def _band_of(u: int, v: int, out_f: int, in_f: int, n_bands: int) -> int:
    """Smallest b with d <= (b+1) d_max / B, in exact integers."""
    d2, big = u * u + v * v, (out_f - 1) ** 2 + (in_f - 1) ** 2
    return next(b for b in range(n_bands) if n_bands * n_bands * d2 <= (b + 1) ** 2 * big)


@pytest.mark.parametrize("n", [1, 2, 7, 24, 48])
def test_dct_matrix_is_orthonormal_and_matches_formula(n):
    eye = torch.eye(n, dtype=torch.float64)
    c = dct_rows(eye).T  # rows of I C^T = C^T
    assert torch.allclose(c, _cosine(n), rtol=0, atol=1e-12)
    assert torch.allclose(c @ c.T, eye, rtol=0, atol=1e-12) and torch.allclose(
        c.T @ c, eye, rtol=0, atol=1e-12
    )
    assert torch.allclose(idct_rows(eye), c, rtol=0, atol=1e-12)  # I C = C


@pytest.mark.parametrize("n", [1, 2, 5, 24, 48, 192, 576])
def test_fft_transforms_equal_the_matrix_products(n):
    x = torch.randn(3, 4, n, dtype=torch.float64)
    c = _cosine(n)
    assert torch.allclose(dct_rows(x), x @ c.T, rtol=0, atol=1e-10)
    assert torch.allclose(idct_rows(x), x @ c, rtol=0, atol=1e-10)
    assert torch.allclose(idct_rows(dct_rows(x)), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (13, 13)])
def test_delta_w_equals_explicit_sum_of_outer_products(shape):
    out_f, in_f = shape
    cfg = _cfg(n_frequency=30, scaling=1.7)
    w = torch.randn(shape, dtype=torch.float64)
    p = M.init_params(cfg, w.float(), "random", torch.Generator().manual_seed(0))
    assert (p["dct_coef"].abs() > 0).all()
    c_out, c_in = _cosine(out_f), _cosine(in_f)
    expected = w.clone()
    for j in range(30):
        u, v = int(p["dct_rows"][j]), int(p["dct_cols"][j])
        expected += 1.7 * float(p["dct_coef"][j]) * torch.outer(c_out[u], c_in[v])
    # W' = W + alpha C_out^T S C_in with the dense S, too
    s = torch.zeros(shape, dtype=torch.float64)
    s[p["dct_rows"].long(), p["dct_cols"].long()] = p["dct_coef"].double()
    assert torch.allclose(w + 1.7 * c_out.T @ s @ c_in, expected, rtol=0, atol=1e-12)
    ref, _ = M.reference_weight(cfg, p, w, None)
    assert torch.allclose(ref, expected, rtol=0, atol=1e-12)
    merged, _ = M.merged_weight(cfg, p, w, None)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-10)
    assert (merged - w).abs().max() > 0.1 * w.abs().max()  # a real update, not a no-op


def test_band_index_boundaries_are_exact():
    for out_f, in_f, n_bands in [(4, 4, 3), (10, 1, 3), (7, 19, 4), (1, 1, 3), (16, 16, 5)]:
        got = band_index(out_f, in_f, n_bands)
        want = [[_band_of(u, v, out_f, in_f, n_bands) for v in range(in_f)] for u in range(out_f)]
        assert got.tolist() == want
    # 4x4: d(1,1) = sqrt(2) = d_max/3 exactly, which is the low band ("<=")
    assert band_index(4, 4, 3)[1, 1] == 0 and band_index(4, 4, 3)[1, 2] == 1


def test_band_quotas_split_and_shortfall():
    assert band_quotas([1000, 1000, 1000], 700) == [233, 233, 234]
    assert band_quotas([1000] * 4, 10) == [2, 2, 2, 4]
    # empty middle band: its share moves on to the high band
    assert band_quotas([1, 0, 3], 4) == [1, 0, 3]
    assert band_quotas([1, 0, 3], 3) == [1, 0, 2]
    # high band too small: the rest comes from the bands before it, highest first
    assert band_quotas([4, 3, 3], 10) == [4, 3, 3]
    assert band_quotas([5, 2, 1], 7) == [4, 2, 1]
    with pytest.raises(ValueError):
        band_quotas([1, 1, 1], 4)


@pytest.mark.parametrize(
    "shape,n,n_bands,delta", [((24, 48), 100, 3, 0.7), ((8, 24), 20, 3, 0.7), ((30, 20), 61, 4, 0.5)]
)
def test_selection_rule(shape, n, n_bands, delta):
    out_f, in_f = shape
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rows, cols = select_positions(w, n, delta, n_bands, seed=5)
    assert rows.dtype == cols.dtype == torch.int32 and rows.shape == cols.shape == (n,)
    again = select_positions(w, n, delta, n_bands, seed=5)
    assert torch.equal(rows, again[0]) and torch.equal(cols, again[1])  # deterministic for a seed
    other = select_positions(w, n, delta, n_bands, seed=6)
    assert not (torch.equal(rows, other[0]) and torch.equal(cols, other[1]))  # the random share moves
    assert ((rows >= 0) & (rows < out_f) & (cols >= 0) & (cols < in_f)).all()
    flat = rows.long() * in_f + cols.long()
    assert torch.unique(flat).numel() == n
    energy = (_cosine(out_f) @ w.double() @ _cosine(in_f).T).square()
    band = [_band_of(u, v, out_f, in_f, n_bands) for u in range(out_f) for v in range(in_f)]
    sizes = [band.count(b) for b in range(n_bands)]
    takes = band_quotas(sizes, n)
    assert takes == [n // n_bands] * (n_bands - 1) + [n - (n_bands - 1) * (n // n_bands)]  # no shortfall here
    chosen = set(flat.tolist())
    for b, k in enumerate(takes):
        members = [f for f in range(out_f * in_f) if band[f] == b]
        assert sum(f in chosen for f in members) == k
        top = sorted(members, key=lambda f: -float(energy.flatten()[f]))[: math.ceil(delta * k - 1e-9)]
        assert set(top) <= chosen, f"band {b}: a top-energy position is missing"


def test_selection_shortfall_and_full_matrix():
    w = torch.randn(1, 10)  # bands by d = v, d_max = 9: {0..3}, {4..6}, {7..9}
    rows, cols = select_positions(w, 10, 0.7, 3, seed=0)
    assert sorted(cols.tolist()) == list(range(10)) and rows.tolist() == [0] * 10
    rows, cols = select_positions(w, 9, 1.0, 3, seed=0)  # quotas [3,3,3]: top 3 of each band by energy
    energy = (w.double() @ _cosine(10).T).square()[0]
    for lo, hi in [(0, 4), (4, 7), (7, 10)]:
        top = sorted(range(lo, hi), key=lambda v: -float(energy[v]))[:3]
        assert set(top) <= set(cols.tolist())


def test_selection_ties_go_to_the_lowest_index():
    w = torch.zeros(6, 8)  # every energy is 0: with delta = 1 each band takes its first positions
    rows, cols = select_positions(w, 9, 1.0, 3, seed=0)
    band = band_index(6, 8, 3).flatten()
    flat = set((rows.long() * 8 + cols.long()).tolist())
    for b in range(3):
        assert flat & set((band == b).nonzero().squeeze(1).tolist()) == set(
            (band == b).nonzero().squeeze(1)[:3].tolist()
        )


def test_train_and_identity_init_use_the_selection_and_zero_coefficients():
    cfg = _cfg(n_frequency=40, delta=0.6, n_bands=2, selection_seed=9)
    w = torch.randn(16, 24)
    for mode in ("train", "identity"):
        p = M.init_params(cfg, w, mode, torch.Generator().manual_seed(0))
        rows, cols = select_positions(w, 40, 0.6, 2, 9)
        assert torch.equal(p["dct_rows"], rows) and torch.equal(p["dct_cols"], cols)
        assert torch.equal(p["dct_coef"], torch.zeros(40))


def test_zero_init_still_learns():
    """c = 0 is the identity, yet dL/dc_j = alpha <dL/dW, outer(C_out[u_j], C_in[v_j])> is non-zero."""
    cfg = _cfg(n_frequency=30)
    w, b = torch.randn(12, 20), torch.randn(12)
    p = M.init_params(cfg, w, "train", torch.Generator().manual_seed(0))
    p["dct_coef"].requires_grad_(True)
    x = torch.randn(6, 20)
    y = adapted_forward(M, cfg, p, x, w, b)
    assert torch.allclose(y, x @ w.T + b, atol=1e-6)
    (y * torch.randn_like(y)).sum().backward()
    assert (p["dct_coef"].grad.abs() > 0).all()


def _params(rows, cols):
    n = len(rows)
    return {
        "dct_coef": torch.ones(n),
        "dct_rows": torch.tensor(rows, dtype=torch.int32),
        "dct_cols": torch.tensor(cols, dtype=torch.int32),
    }


@pytest.mark.parametrize(
    "rows,cols,tensor,msg",
    [
        ([0, 8, 1], [0, 1, 2], "dct_rows", "outside [0, 8)"),
        ([0, -1, 1], [0, 1, 2], "dct_rows", "is -1"),
        ([0, 1, 2], [0, 24, 2], "dct_cols", "outside [0, 24)"),
        ([3, 1, 3], [5, 2, 5], "dct_rows", "duplicate"),
    ],
)
def test_check_params_rejects_bad_positions(rows, cols, tensor, msg):
    cfg = _cfg(n_frequency=3)
    M.check_params(cfg, "m.k_proj", _params([3, 1, 3], [5, 2, 6]), 8, 24)  # valid: same row, other col
    with pytest.raises(WeightsError) as e:
        M.check_params(cfg, "m.k_proj", _params(rows, cols), 8, 24)
    assert e.value.where == f"base_model.model.m.k_proj.{tensor}" and msg in str(e.value)


def test_config_validation():
    cfg = _cfg()
    assert (cfg.n_frequency, cfg.scaling, cfg.delta, cfg.n_bands, cfg.dct_norm) == (700, 1.0, 0.7, 3, "ortho")
    with pytest.raises(ConfigError) as e:
        cfg.check_shape("model.layers.0.self_attn.k_proj", 8, 24)
    assert e.value.where == "n_frequency" and "700" in str(e.value) and "self_attn.k_proj" in str(e.value)
    _cfg(n_frequency=192).check_shape("k", 8, 24)  # the whole matrix is allowed
    with pytest.raises(ConfigError):
        M.init_params(cfg, torch.randn(8, 24), "train", torch.Generator())
    for bad, where in [
        ({"dct_norm": "backward"}, "dct_norm"),
        ({"delta": 1.5}, "delta"),
        ({"n_frequency": 0}, "n_frequency"),
        ({"n_bands": 0}, "n_bands"),
        ({"scaling": 0.0}, "scaling"),
        ({"selection_seed": -1}, "selection_seed"),
        ({"peft_type": "LORA"}, "peft_type"),
        ({"spectrum_seed": 3}, "spectrum_seed"),
    ]:
        with pytest.raises(ConfigError) as e:
            _cfg(**bad)
        assert e.value.where == where


def test_different_n_share_a_padded_table():
    """Adapters with n = 20 and n = 50 pad to one signature (64); padding (c = 0) is harmless."""
    out_f, in_f = 24, 48
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    cfgs = [_cfg(n_frequency=20, scaling=2.0), _cfg(n_frequency=50, scaling=0.5), _cfg(n_frequency=20)]
    assert len({M.signature(c, out_f, in_f) for c in cfgs}) == 1
    ps = [M.init_params(c, w, "random", torch.Generator().manual_seed(i)) for i, c in enumerate(cfgs)]
    table = stack_prepared([M.prepare(c, p, w) for c, p in zip(cfgs, ps, strict=True)])
    slots = torch.tensor([2, 0, 1, 1, 0, 2, 1])
    x = torch.randn(len(slots), in_f)
    y = batched_linear(x, w, b, [Group(M, M.signature(cfgs[0], out_f, in_f), table, None, slots)])
    for r, s in enumerate(slots.tolist()):
        w2, _ = M.reference_weight(cfgs[s], ps[s], w, b)
        assert torch.allclose(y[r], x[r] @ w2.T + b, atol=1e-4)
        assert not torch.allclose(y[r], x[r] @ w.T + b, atol=1e-2)


def test_half_precision_input_keeps_its_dtype():
    cfg = _cfg(n_frequency=50)
    w = torch.randn(16, 32)
    p = M.init_params(cfg, w, "random", torch.Generator().manual_seed(0))
    x = torch.randn(5, 32)
    y32 = adapted_forward(M, cfg, p, x, w, None)
    y16 = adapted_forward(M, cfg, p, x.bfloat16(), w.bfloat16(), None)
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, atol=0.05 * y32.abs().max())
