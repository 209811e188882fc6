"""SURM-specific checks: PEFT C3A parity, non-square block semantics, kron_factor rules, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch

from server.methods import (
    Adapter,
    ConfigError,
    Group,
    adapted_forward,
    batched_linear,
    get_method,
    stack_prepared,
)

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
        _cfg(variant="ldr")
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


@pytest.mark.parametrize("variant", ["circulant", "toeplitz", "kronecker"])
def test_bf16_weight_and_input(variant):
    extra = {"kron_factor": 4} if variant == "kronecker" else {}
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
