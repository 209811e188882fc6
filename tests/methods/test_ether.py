"""ETHER / ETHER+ specific checks: PEFT HRA parity, reflection properties, two-sided ETHER+, config rules."""

from __future__ import annotations

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

from .cases import MODULE_SHAPES

M = get_method("ether")


def _cfg(**fields):
    return M.parse_config({"peft_type": "ETHER", "target_modules": ["lin"], **fields})


def _setup(shape, seed=0, mode="random", **fields):
    cfg = _cfg(**fields)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    return cfg, weight, bias, M.init_params(cfg, weight, mode, g)


def _dense_h(u, v=None):
    """Block-diagonal H built entry by entry from the formulas (independent of ether.py)."""
    n, b = u.shape
    h = torch.zeros(n * b, n * b, dtype=torch.float64)
    for k in range(n):
        uk = u[k].double() / u[k].double().norm()
        if v is None:
            blk = torch.eye(b, dtype=torch.float64) - 2 * uk[:, None] * uk[None, :]
        else:
            vk = v[k].double() / v[k].double().norm()
            blk = torch.eye(b, dtype=torch.float64) - uk[:, None] * uk[None, :] + vk[:, None] * vk[None, :]
        h[k * b : (k + 1) * b, k * b : (k + 1) * b] = blk
    return h


# ---- (a) PEFT parity: one-block input-side ETHER == HRA with one reflection ----------------------


def test_one_block_input_ether_equals_peft_hra_r1():
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 12)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = Tiny()
    weight, bias = model.lin.weight.detach().clone(), model.lin.bias.detach().clone()
    cfg, _, _, params = _setup((12, 16), seed=1, variant="ether", side="in", n_blocks=1)
    u = params["ether_u_in"]  # [1, 16]
    model = peft.inject_adapter_in_model(
        peft.HRAConfig(r=1, apply_GS=False, init_weights=False, target_modules=["lin"]), model
    )
    with torch.no_grad():
        model.lin.hra_u["default"].copy_(u.T)  # HRA stores the reflection vector as a column [in, r]
    x = torch.randn(5, 16)
    with torch.no_grad():
        y_peft = model(x)
        hra_w = model.lin.get_base_layer().weight @ model.lin.get_delta_weight("default")  # W H
    y_ours = adapted_forward(M, cfg, params, x, weight, bias)
    assert (y_ours - y_peft).abs().max() < 1e-5
    assert (y_ours - (x @ weight.T + bias)).abs().max() > 1e-2  # the reflection did something
    w_merged, b_merged = M.merged_weight(cfg, params, weight, bias)
    assert (w_merged - hra_w).abs().max() < 1e-5
    assert torch.equal(b_merged, bias)


# ---- (b) properties of H ---------------------------------------------------------------------------


@pytest.mark.parametrize("side,n_blocks", [("in", 1), ("in", 3), ("out", 1), ("out", 2)])
def test_ether_h_is_block_diagonal_orthogonal_involution(side, n_blocks):
    shape = (12, 18)
    cfg, weight, bias, params = _setup(shape, seed=2, variant="ether", side=side, n_blocks=n_blocks)
    d = shape[1] if side == "in" else shape[0]
    b = d // n_blocks
    # H itself, read off the fast merge of a square identity "weight" of the side's size: I H = H I = H.
    eye = torch.eye(d)
    h, _ = M.merged_weight(cfg, params, eye, None)
    assert torch.allclose(h, h.T, atol=1e-6)
    assert torch.allclose(h @ h.T, eye, atol=1e-5)  # orthogonal
    assert torch.allclose(h @ h, eye, atol=1e-5)  # involution
    for k in range(n_blocks):
        blk = h[k * b : (k + 1) * b, k * b : (k + 1) * b]
        assert torch.linalg.det(blk.double()).item() == pytest.approx(-1.0, abs=1e-6)  # a reflection
        assert (blk - torch.eye(b)).norm().item() == pytest.approx(2.0, abs=1e-5)  # never the identity
    mask = torch.block_diag(*[torch.ones(b, b)] * n_blocks).bool()
    assert torch.equal(h[~mask], torch.zeros_like(h[~mask]))  # truly block-diagonal
    assert torch.allclose(h.double(), _dense_h(params[f"ether_u_{side}"]), atol=1e-6)
    # Merging twice gives W back; applying the on-the-fly transform twice gives x back.
    w1, b1 = M.merged_weight(cfg, params, weight, bias)
    assert (w1 - weight).abs().max() > 1e-2
    w2, b2 = M.merged_weight(cfg, params, w1, b1)
    assert (w2 - weight).abs().max() < 1e-5
    assert torch.equal(b2, bias)  # bias never transformed


def test_etherplus_two_sided_matches_h_out_w_h_in():
    shape = (8, 12)
    cfg, weight, bias, params = _setup(shape, seed=3, variant="etherplus", side="both", n_blocks=2)
    assert set(params) == {"ether_u_in", "ether_v_in", "ether_u_out", "ether_v_out"}
    h_in = _dense_h(params["ether_u_in"], params["ether_v_in"])
    h_out = _dense_h(params["ether_u_out"], params["ether_v_out"])
    assert (h_in - torch.eye(12, dtype=torch.float64)).abs().max() > 1e-2  # random mode: v independent of u
    expected_w = (h_out @ weight.double() @ h_in).float()
    x = torch.randn(2, 3, 12)
    expected_y = x @ expected_w.T + bias
    for w, b in (M.merged_weight(cfg, params, weight, bias), M.reference_weight(cfg, params, weight, bias)):
        assert (w - expected_w).abs().max() < 1e-5
        assert torch.equal(b, bias)
    assert (adapted_forward(M, cfg, params, x, weight, bias) - expected_y).abs().max() < 1e-5
    # Symmetric (not orthogonal in general); eigenvalues 1 ± sin θ on span{û, v̂}, 1 elsewhere.
    assert torch.allclose(h_in, h_in.T)
    u, v = params["ether_u_in"][0].double(), params["ether_v_in"][0].double()
    cos = (u @ v / (u.norm() * v.norm())).item()
    sin = math.sqrt(1 - cos**2)
    ev = torch.linalg.eigvalsh(h_in[:6, :6])
    assert torch.allclose(ev, torch.tensor([1 - sin, 1, 1, 1, 1, 1 + sin], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("side", ["in", "out", "both", "auto"])
def test_etherplus_train_init_is_exact_identity_and_trainable(side):
    cfg, weight, bias, params = _setup(
        (8, 12), seed=4, mode="train", variant="etherplus", side=side, n_blocks=2
    )
    for s in ("in", "out"):
        if f"ether_u_{s}" in params:
            assert torch.equal(params[f"ether_v_{s}"], -params[f"ether_u_{s}"])
            assert params[f"ether_u_{s}"].abs().min() > 0
    x = torch.randn(6, 12)
    for p in params.values():
        p.requires_grad_(True)
    y = adapted_forward(M, cfg, params, x, weight, bias)
    assert torch.equal(y.detach(), torch.nn.functional.linear(x, weight) + bias)
    assert torch.equal(M.merged_weight(cfg, params, weight, bias)[0], weight)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_train_init_is_kaiming_uniform_sqrt5():
    cfg, _, _, params = _setup((64, 64), seed=5, mode="train", variant="ether", side="in", n_blocks=4)
    u = params["ether_u_in"]  # [4, 16]: bound 1/sqrt(16)
    assert u.shape == (4, 16) and u.dtype == torch.float32
    assert u.abs().max() <= 0.25 and u.abs().max() > 0.2


def test_variants_blocks_and_sides_coexist_in_one_batch():
    shape = (12, 18)
    g = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    fields = [
        {"variant": "ether", "side": "out", "n_blocks": 3},
        {"variant": "etherplus", "side": "out", "n_blocks": 3},
        {"variant": "ether", "side": "in", "n_blocks": 1},
        {"variant": "etherplus", "side": "both", "n_blocks": 2},
        {"variant": "ether", "side": "out", "n_blocks": 3},  # shares a table with adapter 0
    ]
    adapters = []
    for i, f in enumerate(fields):
        cfg = _cfg(**f)
        adapters.append((cfg, M.init_params(cfg, weight, "random", torch.Generator().manual_seed(10 + i))))
    sigs = [M.signature(cfg, *shape) for cfg, _ in adapters]
    assert len(set(sigs)) == 4 and sigs[0] == sigs[4]
    assert [M.hooks(s) for s in sigs[:4]] == [{"post"}, {"post"}, {"pre"}, {"pre", "post"}]
    owners = [4, 0, 3, 1, 2, 2, 0, 3, 1, 4, None, 3]
    x = torch.randn(len(owners), shape[1], generator=g)
    groups = []
    for sig in dict.fromkeys(sigs):
        members = [a for a, s in enumerate(sigs) if s == sig]
        table = stack_prepared([M.prepare(*adapters[a], weight) for a in members])
        rows = [r for r, o in enumerate(owners) if o in members]
        slots = [members.index(owners[r]) for r in rows]
        groups.append(Group(M, sig, table, torch.tensor(rows), torch.tensor(slots)))
    y = batched_linear(x, weight, bias, groups)
    for r, o in enumerate(owners):
        w2, b2 = (weight, bias) if o is None else M.reference_weight(*adapters[o], weight, bias)
        assert (y[r] - (x[r] @ w2.T + b2)).abs().max() < 1e-5
        assert o is None or (y[r] - (x[r] @ weight.T + bias)).abs().max() > 1e-2


# ---- (c) configuration ------------------------------------------------------------------------------


def test_defaults_and_auto_side():
    cfg = _cfg()
    assert (cfg.variant, cfg.side, cfg.n_blocks) == ("etherplus", "auto", 1)
    assert set(M.param_specs(cfg, 8, 24)) == {"ether_u_out", "ether_v_out"}  # out < in -> out
    assert set(M.param_specs(cfg, 48, 24)) == {"ether_u_in", "ether_v_in"}  # in < out -> in
    assert set(M.param_specs(cfg, 24, 24)) == {"ether_u_in", "ether_v_in"}  # tie -> in
    specs = M.param_specs(_cfg(variant="ether", side="out", n_blocks=4), 8, 24)
    assert {k: s.shape for k, s in specs.items()} == {"ether_u_out": (4, 2)}
    assert M.trainable_count(_cfg(side="both", n_blocks=2), 8, 24) == 2 * (8 + 24)


def test_n_blocks_must_divide_the_chosen_side():
    with pytest.raises(
        ConfigError, match=r"n_blocks=5 does not divide in_features=24 of model.layers.0.mlp.up_proj"
    ):
        _cfg(n_blocks=5, side="in").check_shape("model.layers.0.mlp.up_proj", 48, 24)
    with pytest.raises(ConfigError, match=r"n_blocks=5 does not divide out_features=8 of k"):
        _cfg(n_blocks=5, side="out").check_shape("k", 8, 25)
    _cfg(n_blocks=5, side="out").check_shape("ok", 10, 24)  # only the chosen side matters
    with pytest.raises(ConfigError, match=r"n_blocks=3 does not divide out_features=8"):
        _cfg(n_blocks=3, side="both").check_shape("k", 8, 24)  # in=24 fine, out=8 not
    with pytest.raises(ConfigError, match="size 1"):
        _cfg(n_blocks=8, side="out").check_shape("k", 8, 24)
    # The same check guards loading an adapter onto a base model.
    bad = M.parse_config({"peft_type": "ETHER", "target_modules": ["q_proj"], "n_blocks": 5, "side": "in"})
    with pytest.raises(ConfigError, match=r"n_blocks=5 does not divide in_features=24 of .*q_proj") as e:
        Adapter.from_state_dict(M, bad, {}, MODULE_SHAPES)
    assert e.value.where == "n_blocks"


@pytest.mark.parametrize(
    "fields,where,pattern",
    [
        ({"variant": "ether", "side": "both"}, "side", "only defined for variant='etherplus'"),
        ({"variant": "householder"}, "variant", "'ether' or 'etherplus'"),
        ({"side": "left"}, "side", "'in', 'out', 'both' or 'auto'"),
        ({"n_blocks": 0}, "n_blocks", "greater than or equal to 1"),
        ({"n_blocks": "2"}, "n_blocks", "valid integer"),
        ({"n_blocks": 2.0}, "n_blocks", "valid integer"),
        ({"flip_side": True}, "flip_side", "Extra inputs"),
    ],
)
def test_config_errors(fields, where, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        _cfg(**fields)
    assert e.value.where == where
    _cfg(variant="etherplus", side="both")  # two-sided ETHER+ is valid


def test_plain_ether_has_no_identity_init():
    cfg = _cfg(variant="ether")
    with pytest.raises(ConfigError, match="never the identity.*etherplus") as e:
        M.init_params(cfg, torch.randn(8, 8), "identity", torch.Generator().manual_seed(0))
    assert e.value.where == "variant"


def test_zero_vector_is_rejected_on_load():
    cfg, weight, _, params = _setup((8, 12), variant="etherplus", side="in", n_blocks=3)
    params["ether_v_in"][1] = 0
    with pytest.raises(WeightsError, match="block 1 is an all-zero vector"):
        M.check_params(cfg, "lin", params, 8, 12)
