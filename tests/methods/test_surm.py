"""SURM-specific checks: PEFT C3A parity, non-square block semantics, kron_factor rules, bf16, and
the low-displacement-rank variant (dense Z matrices, the skew-circulant FFT identity, ldr_rank)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server.methods import (
    Adapter,
    ConfigError,
    Group,
    WeightsError,
    adapted_forward,
    batched_linear,
    get_method,
    stack_prepared,
)
from server.methods import _surm_ldr as ldr_math
from server.methods.surm import SurmSig

MODULE = "model.layers.0.self_attn.k_proj"


def _cfg(**fields):
    return get_method("surm").parse_config({"peft_type": "SURM", "target_modules": ["k_proj"], **fields})


def _random(cfg, shape, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    return weight, bias, get_method("surm").init_params(cfg, weight, "random", g)


def _assert_close(actual, expected, rel=1e-4):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x scale {scale:.3g}"


def _explicit_delta(variant: str, params: dict, out_f: int, in_f: int) -> torch.Tensor:
    """ΔW from the index formulas, entry by entry (independent of the module under test)."""
    n = max(out_f, in_f)
    if variant == "circulant":
        c = (params["surm_r1"] * params["surm_r2"]).tolist()
        dw = [[c[(i - j) % n] for j in range(in_f)] for i in range(out_f)]
    else:
        a, b = params["surm_a"].tolist(), params["surm_b"].tolist()
        dw = [
            [sum(b[abs(i - k)] * a[abs(k - j)] for k in range(n)) for j in range(in_f)] for i in range(out_f)
        ]
    return torch.tensor(dw, dtype=torch.float32)


# ---- (a) PEFT parity: one-block circulant == PEFT C3A with block_size = n ----------------------


def test_circulant_matches_peft_c3a_single_block():
    peft = pytest.importorskip("peft")
    n, alpha = 12, 1.5
    cfg = _cfg(variant="circulant", alpha=alpha)
    weight, bias, params = _random(cfg, (n, n), 0)
    c = params["surm_r1"] * params["surm_r2"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(weight)
        net.lin.bias.copy_(bias)
    model = peft.get_peft_model(net, peft.C3AConfig(block_size=n, target_modules=["lin"], init_weights=True))
    layer = model.base_model.model.lin
    # C3A: ΔW[m, k] = w[(k − m) mod n] / in; SURM: α·c[(m − k) mod n]  =>  w[k] = in·α·c[(−k) mod n].
    w = n * alpha * torch.cat([c[:1], c[1:].flip(0)])
    with torch.no_grad():
        layer.c3a_kernel["default"].copy_(w.view(1, 1, n))

    x = torch.randn(5, n)
    with torch.no_grad():
        expected = model(x)
    method = get_method("surm")
    _assert_close(adapted_forward(method, cfg, params, x, weight, bias), expected)
    w_ref, _ = method.reference_weight(cfg, params, weight, bias)
    _assert_close(w_ref - weight, layer.get_delta_weight("default").detach())
    w_m, _ = method.merged_weight(cfg, params, weight, bias)
    _assert_close(x @ w_m.T + bias, expected)


# ---- (b) non-square: top-left [out, in] block of the N x N matrix ------------------------------


@pytest.mark.parametrize("variant", ["circulant", "toeplitz"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (8, 24), (48, 24), (7, 7)])
def test_top_left_block_semantics(variant, shape):
    out_f, in_f = shape
    cfg = _cfg(variant=variant, alpha=0.7)
    weight, bias, params = _random(cfg, shape, 1)
    method = get_method("surm")
    n = max(shape)
    assert all(t.shape == (n,) for t in params.values())
    expected_w = weight + 0.7 * _explicit_delta(variant, params, out_f, in_f)
    _assert_close(method.reference_weight(cfg, params, weight, bias)[0], expected_w, 1e-5)
    _assert_close(method.merged_weight(cfg, params, weight, bias)[0], expected_w, 1e-5)
    x = torch.randn(3, 4, in_f)
    _assert_close(adapted_forward(method, cfg, params, x, weight, bias), x @ expected_w.T + bias)


def test_circulant_first_column_is_c():
    cfg = _cfg(variant="circulant")
    weight, bias, params = _random(cfg, (6, 6), 2)
    c = params["surm_r1"] * params["surm_r2"]
    dw = get_method("surm").merged_weight(cfg, params, torch.zeros(6, 6), None)[0]
    assert torch.equal(dw[:, 0], c)  # first column = c
    assert torch.equal(dw[0], torch.cat([c[:1], c[1:].flip(0)]))  # first row = c[(-j) mod N]
    assert torch.equal(dw[1:, 1:], dw[:-1, :-1])  # constant diagonals


def test_mixed_surm_batch_three_variants():
    """Every variant (two Kronecker factors) and plain rows in one batch, two slots per signature."""
    shape = (24, 48)
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    method = get_method("surm")
    configs = [
        _cfg(variant="circulant", alpha=1.5),
        _cfg(variant="toeplitz", alpha=0.5),
        _cfg(variant="kronecker", kron_factor=4),
        _cfg(variant="kronecker", kron_factor=8, alpha=2.0),
    ] * 2
    adapters = [(cfg, method.init_params(cfg, weight, "random", g)) for cfg in configs]
    owners = [None, 3, 0, 7, 1, 5, 2, 6, None, 4, 0, 3, 6, 2, 1, 7, 5, 4]
    x = torch.randn(len(owners), shape[1], generator=g)
    by_sig: dict = {}
    for a, (cfg, _) in enumerate(adapters):
        by_sig.setdefault(method.signature(cfg, *shape), []).append(a)
    assert len(by_sig) == 4
    groups = []
    for sig, members in by_sig.items():
        table = stack_prepared([method.prepare(*adapters[a], weight) for a in members])
        rows = [r for r, o in enumerate(owners) if o in members]
        slots = [members.index(owners[r]) for r in rows]
        groups.append(Group(method, sig, table, torch.tensor(rows), torch.tensor(slots)))
    y = batched_linear(x, weight, bias, groups)
    for r, o in enumerate(owners):
        w2 = weight if o is None else method.reference_weight(*adapters[o], weight, bias)[0]
        _assert_close(y[r], x[r] @ w2.T + bias)


def test_signature_ignores_alpha_and_separates_variants():
    method = get_method("surm")
    assert method.signature(_cfg(alpha=1.0), 8, 24) == method.signature(_cfg(alpha=3.0), 8, 24)
    sigs = {
        method.signature(_cfg(variant="circulant"), 8, 24),
        method.signature(_cfg(variant="toeplitz"), 8, 24),
        method.signature(_cfg(variant="kronecker", kron_factor=2), 8, 24),
        method.signature(_cfg(variant="kronecker", kron_factor=4), 8, 24),
        method.signature(_cfg(variant="circulant"), 24, 8),
    }
    assert len(sigs) == 5
    assert method.hooks(method.signature(_cfg(), 8, 24)) == frozenset({"delta"})


# ---- (c) Kronecker: factor rules and the reshaped matmul -------------------------------------


@pytest.mark.parametrize("f", [1, 2, 4, 8])  # small f: x·Aᵀ first; large f: B·X first
def test_kronecker_on_the_fly_equals_torch_kron(f):
    cfg = _cfg(variant="kronecker", kron_factor=f, alpha=0.5)
    weight, bias, params = _random(cfg, (16, 8), 3)
    assert params["surm_kron_A"].shape == (f, 8 // f) and params["surm_kron_B"].shape == (16 // f, f)
    dw = torch.kron(params["surm_kron_B"], params["surm_kron_A"])
    x = torch.randn(6, 8)
    expected = x @ (weight + 0.5 * dw).T + bias
    _assert_close(adapted_forward(get_method("surm"), cfg, params, x, weight, bias), expected)


def test_kron_factor_config_errors():
    for fields, msg in [
        ({"variant": "kronecker"}, "kron_factor is required for variant='kronecker'"),
        ({"variant": "kronecker", "kron_factor": 0}, "kron_factor must be >= 1, got 0"),
        ({"variant": "circulant", "kron_factor": 4}, "only used by variant='kronecker', not 'circulant'"),
        ({"kron_factor": 4}, "only used by variant='kronecker', not 'circulant'"),  # default variant
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            _cfg(**fields)
        assert e.value.where == "kron_factor"
    cfg = _cfg(variant="kronecker", kron_factor=5)
    with pytest.raises(ConfigError, match=f"kron_factor=5 does not divide in_features=24 of {MODULE}"):
        cfg.check_shape(MODULE, 10, 24)
    with pytest.raises(ConfigError, match=f"kron_factor=5 does not divide out_features=8 of {MODULE}"):
        cfg.check_shape(MODULE, 8, 25)
    cfg.check_shape(MODULE, 10, 25)  # divides both: fine
    with pytest.raises(ConfigError, match="does not divide"):
        get_method("surm").param_specs(cfg, 8, 25)


def test_kron_factor_error_on_load(tmp_path):
    method = get_method("surm")
    good = _cfg(variant="kronecker", kron_factor=4)
    params = method.init_params(good, torch.randn(8, 24), "random", torch.Generator().manual_seed(0))
    Adapter(method, good, {MODULE: params}, {MODULE: (8, 24)}).save(tmp_path)
    assert Adapter.load(tmp_path, {MODULE: (8, 24)}).modules[MODULE].keys() == params.keys()
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "kron_factor": 3}))
    with pytest.raises(ConfigError, match=f"kron_factor=3 does not divide out_features=8 of {MODULE}"):
        Adapter.load(tmp_path, {MODULE: (8, 24)})


def test_other_config_errors_and_defaults():
    cfg = _cfg()
    assert (cfg.variant, cfg.alpha, cfg.kron_factor) == ("circulant", 1.0, None)
    with pytest.raises(ConfigError) as e:
        _cfg(variant="lowrank")
    assert e.value.where == "variant"
    with pytest.raises(ConfigError) as e:
        _cfg(alpha=math.nan)
    assert e.value.where == "alpha"
    with pytest.raises(ConfigError) as e:
        _cfg(circulant_rank=2)
    assert e.value.where == "circulant_rank"


@pytest.mark.parametrize("variant", ["circulant", "toeplitz", "kronecker"])
def test_train_init_has_one_zero_factor_and_one_random(variant):
    extra = {"kron_factor": 4} if variant == "kronecker" else {}
    cfg = _cfg(variant=variant, **extra)
    params = get_method("surm").init_params(
        cfg, torch.randn(8, 24), "train", torch.Generator().manual_seed(0)
    )
    first, second = params.values()
    assert torch.count_nonzero(second) == 0
    assert torch.count_nonzero(first) == first.numel()
    if variant == "kronecker":
        assert first.abs().max() <= 1 / math.sqrt(24 / 4)
    else:
        assert 0.01 < first.std() < 0.04
    assert get_method("surm").trainable_count(cfg, 8, 24) == (32 if variant == "kronecker" else 48)


# ---- (d) bf16 weights and activations (FFT in float32) ---------------------------------------


@pytest.mark.parametrize("variant", ["circulant", "toeplitz", "kronecker", "ldr"])
def test_bf16_weight_and_input(variant):
    extra = {"kronecker": {"kron_factor": 4}, "ldr": {"ldr_rank": 2}}.get(variant, {})
    cfg = _cfg(variant=variant, alpha=1.5, **extra)
    weight, bias, params = _random(cfg, (8, 24), 4)
    method = get_method("surm")
    w16, b16 = weight.bfloat16(), bias.bfloat16()
    x16 = torch.randn(2, 5, 24).bfloat16()
    w_ref, _ = method.reference_weight(cfg, params, w16.float(), None)
    expected = x16.float() @ w_ref.T + b16.float()
    y = adapted_forward(method, cfg, params, x16, w16, b16)
    assert y.dtype == torch.bfloat16
    _assert_close(y, expected, rel=3e-2)
    # bf16 stored factors and a gathered (index_add) mixed batch also work.
    p16 = {k: v.bfloat16() for k, v in params.items()}
    table = stack_prepared([method.prepare(cfg, p16, w16)] * 2)
    xr = x16.reshape(10, 24)
    rows, slots = torch.arange(1, 10, 2), torch.tensor([0, 1, 1, 0, 1])
    y2 = batched_linear(xr, w16, b16, [Group(method, method.signature(cfg, 8, 24), table, rows, slots)])
    assert y2.dtype == torch.bfloat16
    _assert_close(y2[rows], expected.reshape(10, 8)[rows], rel=3e-2)
    _assert_close(y2[0], xr[0].float() @ w16.float().T + b16.float(), rel=1e-2)


# ---- (e) LDR: W(G, H) = Σ_i Z_1(g_i) Z_{−1}(h_i) -------------------------------------------------


def _z_entries(v: list[float], f: float) -> torch.Tensor:
    """Z_f(v) from its definition, entry by entry: first column v, strict upper triangle times f."""
    n = len(v)
    return torch.tensor(
        [[v[i - j] if i >= j else f * v[n + i - j] for j in range(n)] for i in range(n)], dtype=torch.float64
    )


def _ldr(shape, rank, seed, alpha=1.0):
    cfg = _cfg(variant="ldr", ldr_rank=rank, alpha=alpha)
    weight, bias, params = _random(cfg, shape, seed)
    return cfg, weight, bias, params


@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("f", [1.0, -1.0])
def test_dense_z_matrix_is_the_definition(n, f):
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    z = ldr_math.z_matrix(v, f)
    assert torch.equal(z, _z_entries(v.tolist(), f))
    assert torch.equal(z[:, 0], v)
    if f == 1.0:  # the circulant convention of the other variant: Z_1(v)[i, j] = v[(i − j) mod n]
        assert torch.equal(z, torch.stack([torch.roll(v, j) for j in range(n)], dim=1))


@pytest.mark.parametrize("n", [3, 7, 16])  # odd lengths too: the twist's half-sample shift
def test_skew_circulant_fft_identity(n):
    """The paper's product S(v) x = η̄ ∘ ifft(fft(η∘v) ∘ fft(η∘x)), η_k = exp(iπk/n), is Z_{−1}(v) x."""
    g = torch.Generator().manual_seed(n)
    v, x = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    eta = ldr_math.twist(n, torch.float64, v.device)
    assert eta.dtype == torch.complex128 and abs(complex(eta[1] ** n) + 1) < 1e-12  # η_1ⁿ = −1
    s = eta.conj() * torch.fft.ifft(torch.fft.fft(eta * v) * torch.fft.fft(eta * x))
    expected = _z_entries(v.tolist(), -1.0) @ x
    eps = torch.finfo(torch.float64).eps
    assert float(s.imag.abs().max()) <= 64 * n * eps * float(expected.abs().max())
    torch.testing.assert_close(s.real, expected, rtol=0, atol=64 * n * eps * float(expected.abs().max()))


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (8, 24), (48, 24), (7, 7)])
def test_ldr_rank1_with_unit_h_is_the_circulant_variant(shape):
    """h = e_0 makes Z_{−1}(h) = I: ΔW = Z_1(g) is the circulant variant with c = g (r1 = g, r2 = 1)."""
    cfg, weight, bias, params = _ldr(shape, 1, 6, alpha=0.7)
    n = max(shape)
    params["surm_h"] = torch.zeros(1, n)
    params["surm_h"][0, 0] = 1.0
    circ_cfg = _cfg(variant="circulant", alpha=0.7)
    circ = {"surm_r1": params["surm_g"][0].clone(), "surm_r2": torch.ones(n)}
    method = get_method("surm")
    expected = method.reference_weight(circ_cfg, circ, weight, bias)[0]
    _assert_close(method.reference_weight(cfg, params, weight, bias)[0], expected, 1e-6)
    _assert_close(method.merged_weight(cfg, params, weight, bias)[0], expected, 1e-5)
    x = torch.randn(3, 4, shape[1])
    _assert_close(adapted_forward(method, cfg, params, x, weight, bias), x @ expected.T + bias)


@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5)])
def test_ldr_with_unit_g_is_the_skew_circulant_of_h(shape):
    """g = e_0 makes Z_1(g) = I: ΔW = Z_{−1}(h), the sign flip above the diagonal on the fast paths."""
    cfg, weight, bias, params = _ldr(shape, 1, 7)
    n = max(shape)
    params["surm_g"] = torch.zeros(1, n)
    params["surm_g"][0, 0] = 1.0
    out_f, in_f = shape
    expected = weight + _z_entries(params["surm_h"][0].tolist(), -1.0)[:out_f, :in_f].float()
    method = get_method("surm")
    _assert_close(method.reference_weight(cfg, params, weight, bias)[0], expected, 1e-6)
    _assert_close(method.merged_weight(cfg, params, weight, bias)[0], expected, 1e-5)
    x = torch.randn(4, in_f)
    _assert_close(adapted_forward(method, cfg, params, x, weight, bias), x @ expected.T + bias)


def test_ldr_rank_r_is_the_sum_of_its_rank1_terms():
    """The frequency-domain sum over i equals the r separate products (batched and merged)."""
    shape, rank = (8, 24), 3
    cfg, weight, bias, params = _ldr(shape, rank, 8, alpha=-1.25)
    method = get_method("surm")
    x = torch.randn(5, shape[1])
    one = _cfg(variant="ldr", ldr_rank=1, alpha=-1.25)
    terms = [
        {"surm_g": params["surm_g"][i : i + 1], "surm_h": params["surm_h"][i : i + 1]} for i in range(rank)
    ]
    zero = torch.zeros_like(weight)
    expected = sum(method.merged_weight(one, t, zero, None)[0] for t in terms)
    _assert_close(method.merged_weight(cfg, params, zero, None)[0], expected, 1e-5)
    _assert_close(adapted_forward(method, cfg, params, x, weight, None), x @ (weight + expected).T, 1e-5)


def test_ldr_full_rank_reproduces_an_arbitrary_matrix():
    """r = N spans every N × N matrix (the paper's claim): with h_i = e_i the map G → ΔW is linear
    and, for N = 6, of full rank 36; solving it for a random M, every path then computes W + M."""
    n = 6
    cfg = _cfg(variant="ldr", ldr_rank=n)
    h = torch.eye(n, dtype=torch.float64)  # Z_{−1}(e_i): the i-th power of the skew shift
    basis = torch.eye(n * n, dtype=torch.float64).reshape(n * n, n, n)
    cols = [ldr_math.reference_delta(b, h, n, n).flatten() for b in basis]  # image of each g entry
    jac = torch.stack(cols, dim=1)  # [N², N²]
    assert int(torch.linalg.matrix_rank(jac)) == n * n
    target = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.linalg.solve(jac, target.flatten()).reshape(n, n)
    params = {"surm_g": g.float(), "surm_h": h.float()}
    weight = torch.randn(n, n)
    method = get_method("surm")
    expected = weight + target.float()
    _assert_close(method.reference_weight(cfg, params, weight, None)[0], expected, 1e-5)
    _assert_close(method.merged_weight(cfg, params, weight, None)[0], expected, 1e-5)
    x = torch.randn(3, n)
    _assert_close(adapted_forward(method, cfg, params, x, weight, None), x @ expected.T, 1e-5)


def test_ldr_init_follows_the_paper_code():
    """identity = train: circulant part g zero (ΔW = 0 exactly), skew part h ~ N(0, 0.02);
    random: both non-zero."""
    method = get_method("surm")
    cfg = _cfg(variant="ldr", ldr_rank=4)
    weight = torch.randn(8, 24)
    for mode in ("identity", "train"):
        params = method.init_params(cfg, weight, mode, torch.Generator().manual_seed(0))
        assert params["surm_g"].shape == params["surm_h"].shape == (4, 24)
        assert torch.count_nonzero(params["surm_g"]) == 0
        assert torch.count_nonzero(params["surm_h"]) == params["surm_h"].numel()
        assert 0.015 < float(params["surm_h"].std()) < 0.025  # 96 draws of N(0, 0.02²)
        assert torch.equal(method.merged_weight(cfg, params, weight, None)[0], weight)
    params = method.init_params(cfg, weight, "random", torch.Generator().manual_seed(0))
    assert all(torch.count_nonzero(t) == t.numel() for t in params.values())
    dw = method.merged_weight(cfg, params, torch.zeros_like(weight), None)[0]
    assert 0.1 * weight.std() < dw.std() < weight.std()  # aimed at 0.3x the weight's spread
    assert method.trainable_count(cfg, 8, 24) == 2 * 4 * 24
    with pytest.raises(ConfigError) as e:
        method.init_params(cfg, weight, "kaiming", torch.Generator())
    assert e.value.where == "init"


def test_ldr_rank_config_errors():
    for fields, msg in [
        ({"variant": "ldr"}, "ldr_rank is required for variant='ldr'"),
        ({"variant": "ldr", "ldr_rank": 0}, r"ldr_rank must be in \[1, 64\], got 0"),
        ({"variant": "ldr", "ldr_rank": 65}, r"ldr_rank must be in \[1, 64\], got 65"),
        ({"variant": "ldr", "ldr_rank": "2"}, "valid integer"),  # JSON-strict: no strings
        ({"variant": "ldr", "ldr_rank": 2.0}, "valid integer"),
        ({"variant": "toeplitz", "ldr_rank": 2}, "only used by variant='ldr', not 'toeplitz'"),
        ({"ldr_rank": 2}, "only used by variant='ldr', not 'circulant'"),  # default variant
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            _cfg(**fields)
        assert e.value.where == "ldr_rank", fields
    with pytest.raises(ConfigError) as e:
        _cfg(variant="ldr", ldr_rank=2, kron_factor=2)
    assert e.value.where == "kron_factor"
    cfg = _cfg(variant="ldr", ldr_rank=25)
    with pytest.raises(ConfigError, match=f"ldr_rank=25 exceeds N = max\\(out, in\\) = 24 of {MODULE}") as e:
        cfg.check_shape(MODULE, 8, 24)
    assert e.value.where == "ldr_rank"
    cfg.check_shape(MODULE, 8, 25)  # N = 25: fine
    with pytest.raises(ConfigError, match="exceeds N"):
        get_method("surm").param_specs(cfg, 24, 8)


def test_ldr_rank_error_on_load(tmp_path):
    method = get_method("surm")
    good = _cfg(variant="ldr", ldr_rank=2)
    params = method.init_params(good, torch.randn(8, 24), "random", torch.Generator().manual_seed(0))
    Adapter(method, good, {MODULE: params}, {MODULE: (8, 24)}).save(tmp_path)
    loaded = Adapter.load(tmp_path, {MODULE: (8, 24)})
    assert loaded.config.ldr_rank == 2 and loaded.modules[MODULE].keys() == {"surm_g", "surm_h"}
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "ldr_rank": 3}))
    with pytest.raises(WeightsError, match=r"shape \[2, 24\] != expected \[3, 24\]") as e:
        Adapter.load(tmp_path, {MODULE: (8, 24)})  # the stored [2, 24] tensors do not fit r = 3
    assert e.value.where.endswith(f"{MODULE}.surm_g")
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "ldr_rank": 30}))
    with pytest.raises(ConfigError, match="ldr_rank=30 exceeds N") as e:
        Adapter.load(tmp_path, {MODULE: (8, 24)})
    assert e.value.where == "ldr_rank"


def test_ldr_signature_and_no_fused_kernel():
    """Ranks and shapes separate slot tables; α does not. fast_op answers None for ldr (the torch
    code serves it) before looking at the kernels; the other variants keep their 4-field form."""
    method = get_method("surm")
    sig = method.signature(_cfg(variant="ldr", ldr_rank=2), 8, 24)
    assert sig == SurmSig("ldr", 8, 24, None, 2) and sig.ldr_rank == 2
    assert sig == method.signature(_cfg(variant="ldr", ldr_rank=2, alpha=-3.0), 8, 24)
    assert sig != method.signature(_cfg(variant="ldr", ldr_rank=3), 8, 24)
    assert method.signature(_cfg(variant="kronecker", kron_factor=4), 8, 24) == SurmSig("kronecker", 8, 24, 4)
    assert method.hooks(sig) == frozenset({"delta"}) and method.serving_cost(sig) == "cheap"
    assert method.fast_op(None, sig, "delta", None) is None
    table = stack_prepared(
        [
            method.prepare(_cfg(variant="ldr", ldr_rank=2), p, torch.zeros(8, 24))
            for p in (_random(_cfg(variant="ldr", ldr_rank=2), (8, 24), s)[2] for s in (0, 1))
        ]
    )
    assert table["ldr_h"].shape == (2, 2, 24, 2) and table["ldr_g"].shape == (2, 2, 13, 2)


def test_ldr_float64_stays_float64():
    """Float64 inputs run the FFTs in float64 (complex128): the fast paths then match the dense
    reference to float64 rounding, which a float32 step anywhere would miss."""
    cfg, weight, bias, params = _ldr((9, 5), 2, 10, alpha=0.5)
    w64, b64 = weight.double(), bias.double()
    p64 = {k: v.double() for k, v in params.items()}
    method = get_method("surm")
    w_ref = method.reference_weight(cfg, p64, w64, b64)[0]
    assert w_ref.dtype == torch.float64
    x = torch.randn(4, 5, dtype=torch.float64)
    table = {k: v.unsqueeze(0) for k, v in ldr_math.spectra(p64["surm_g"], p64["surm_h"], 0.5).items()}
    assert table["ldr_h"].dtype == torch.float64
    dy = method.delta(method.signature(cfg, 9, 5), x, table, None, w64)
    assert dy.dtype == torch.float64
    torch.testing.assert_close(x @ w64.T + dy, x @ w_ref.T, rtol=0, atol=1e-12)
