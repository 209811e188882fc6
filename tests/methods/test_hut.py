"""HUT: the literal diag(a) W diag(b) reading, the γ/β placement, mixed ranks, config errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from server.methods import (
    Adapter,
    ConfigError,
    Group,
    adapted_forward,
    batched_linear,
    get_method,
    stack_prepared,
)

METHOD = get_method("hut")
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 24), "model.layers.0.self_attn.k_proj": (8, 24)}


def _cfg(**fields):
    return METHOD.parse_config({"peft_type": "HUT", "target_modules": ["q_proj", "k_proj"], **fields})


def _close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= rel * scale


@pytest.mark.parametrize("scale_shift", [False, True])
def test_rank1_is_the_literal_diag_a_W_diag_b(scale_shift):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(12, 20, generator=g), torch.randn(12, generator=g)
    cfg = _cfg(r=1, use_scale_shift=scale_shift)
    params = METHOD.init_params(cfg, weight, "random", g)
    a, b = params["hut_A"][:, 0], params["hut_B"][0]
    w_lit = torch.diag(a) @ weight @ torch.diag(b)
    x = torch.randn(5, 20, generator=g)
    if scale_shift:  # y = γ ⊙ (x W'ᵀ) + β + b: γ does not scale the original bias
        gamma, beta = params["hut_gamma"], params["hut_beta"]
        want = (x @ w_lit.T) * gamma + beta + bias
    else:
        want = x @ w_lit.T + bias
    assert not torch.allclose(want, x @ weight.T + bias, atol=1e-2)
    _close(adapted_forward(METHOD, cfg, params, x, weight, bias), want)
    w_m, b_m = METHOD.merged_weight(cfg, params, weight, bias)
    _close(x @ w_m.T + b_m, want)
    if scale_shift:
        _close(b_m, bias + params["hut_beta"])  # merged bias = b + β, not γ ⊙ b + β
    else:
        assert b_m is bias
    assert METHOD.hooks(METHOD.signature(cfg, 12, 20)) == {"pre", "post"}
    assert METHOD.serving_cost(METHOD.signature(cfg, 12, 20)) == "cheap"


def test_scale_shift_without_base_bias_creates_bias_beta():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 10, generator=g)
    cfg = _cfg(r=2, use_scale_shift=True)
    params = METHOD.init_params(cfg, weight, "random", g)
    for fn in (METHOD.reference_weight, METHOD.merged_weight):
        _, b = fn(cfg, params, weight, None)
        assert torch.equal(b, params["hut_beta"])


def test_rank_r_is_sum_of_rank1_terms():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 12, generator=g)
    cfg = _cfg(r=3)
    params = METHOD.init_params(cfg, weight, "random", g)
    w_sum = sum(torch.diag(params["hut_A"][:, k]) @ weight @ torch.diag(params["hut_B"][k]) for k in range(3))
    _close(METHOD.reference_weight(cfg, params, weight, None)[0], w_sum)
    _close(METHOD.merged_weight(cfg, params, weight, None)[0], w_sum)
    sig = METHOD.signature(cfg, 16, 12)
    assert METHOD.serving_cost(sig) == "gemm" and "delta" in METHOD.hooks(sig)


def test_train_init_mask_is_all_ones_and_other_rows_small():
    weight = torch.randn(10, 30)
    cfg = _cfg(r=4, use_scale_shift=True)
    p = METHOD.init_params(cfg, weight, "train", torch.Generator().manual_seed(0))
    assert torch.equal(p["hut_A"] @ p["hut_B"], torch.ones(10, 30))
    assert torch.equal(p["hut_A"][:, 0], torch.ones(10)) and not p["hut_A"][:, 1:].any()
    assert torch.equal(p["hut_B"][0], torch.ones(30))
    rest = p["hut_B"][1:]
    assert rest.abs().min() > 0 and rest.abs().max() <= 30**-0.5
    assert torch.equal(p["hut_gamma"], torch.ones(10)) and not p["hut_beta"].any()


def test_mixed_ranks_and_scale_shift_in_one_batch():
    """Rank 1 and rank 3 adapters (with and without γ/β) in one batch: one table per rank."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(20, 16, generator=g), torch.randn(20, generator=g)
    specs = [(1, False), (1, True), (3, True), (3, False), (2, True)]
    adapters = []
    for r, ss in specs:
        cfg = _cfg(r=r, use_scale_shift=ss)
        adapters.append((cfg, METHOD.init_params(cfg, weight, "random", g)))
    owner = torch.randint(-1, len(specs), (40,), generator=g)  # -1: no adapter
    x = torch.randn(40, 16, generator=g)
    groups = []
    for r in sorted({r for r, _ in specs}):
        members = [i for i, (rr, _) in enumerate(specs) if rr == r]
        table = stack_prepared([METHOD.prepare(*adapters[i], weight) for i in members])
        rows = torch.cat([torch.nonzero(owner == i)[:, 0] for i in members])
        slots = torch.tensor([members.index(owner[i].item()) for i in rows.tolist()], dtype=torch.long)
        groups.append(Group(METHOD, METHOD.signature(adapters[members[0]][0], 20, 16), table, rows, slots))
    assert len(groups) == 3
    y = batched_linear(x, weight, bias, groups)
    for i in range(40):
        if owner[i] < 0:
            _close(y[i], x[i] @ weight.T + bias)
            continue
        cfg, params = adapters[owner[i]]
        w2, b2 = METHOD.reference_weight(cfg, params, weight, bias)
        _close(y[i], x[i] @ w2.T + b2)


@pytest.mark.parametrize(
    ("fields", "where", "text"),
    [
        ({"r": 0}, "r", "greater than or equal to 1"),
        ({"r": -2}, "r", "greater than or equal to 1"),
        ({"r": 1.5}, "r", "integer"),
        ({"r": "2"}, "r", "integer"),
        ({"use_scale_shift": "yes"}, "use_scale_shift", "boolean"),
        ({"rank": 2}, "rank", "Extra inputs are not permitted"),
        ({"reading": "diag"}, "reading", "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(fields, where, text):
    with pytest.raises(ConfigError) as e:
        _cfg(**fields)
    assert e.value.where == where and text in str(e.value)


def test_rank_larger_than_the_layer_is_refused_with_numbers():
    cfg = _cfg(r=9)
    cfg.check_shape("model.layers.0.self_attn.q_proj", 24, 24)  # fine
    with pytest.raises(ConfigError, match=r"r=9 exceeds min\(out_features=8, in_features=24\) of .*k_proj"):
        cfg.check_shape("model.layers.0.self_attn.k_proj", 8, 24)
    with pytest.raises(ConfigError, match="k_proj"):  # loading checks every targeted module's shape
        Adapter.from_state_dict(METHOD, cfg, {}, SHAPES)


def test_defaults_and_file_names(tmp_path):
    cfg = _cfg()
    assert cfg.r == 1 and cfg.use_scale_shift is False
    specs = METHOD.param_specs(_cfg(r=2, use_scale_shift=True), 8, 24)
    assert {k: v.shape for k, v in specs.items()} == {
        "hut_A": (8, 2),
        "hut_B": (2, 24),
        "hut_gamma": (8,),
        "hut_beta": (8,),
    }
    g = torch.Generator().manual_seed(0)
    modules = {p: METHOD.init_params(cfg, torch.randn(s), "random", g) for p, s in SHAPES.items()}
    Adapter(METHOD, cfg, modules, dict(SHAPES)).save(tmp_path)
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        f"base_model.model.{p}.{n}" for p in sorted(SHAPES) for n in ("hut_A", "hut_B")
    ]
