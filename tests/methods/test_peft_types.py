"""PEFT types served through a family's math (IA3, HiRA, DoRA): the PEFT-type mapping, their
formulas written out against PEFT's, and PEFT features they do not honour refused by name."""

from __future__ import annotations

import pytest
import torch

from server.methods import ConfigError, Group, batched_linear, get_method, method_for_peft_type, parse_config

from .cases import TARGETS


def _close(actual, expected, n_terms: int):
    """float32 worst-case rounding: eps per term of the reductions, relative to the output scale."""
    tol = 4 * n_terms * torch.finfo(torch.float32).eps * expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= tol


@pytest.mark.parametrize(
    ("peft_type", "extra", "family"),
    [
        ("LORA", {}, "lora"),
        ("LORA", {"use_dora": False}, "lora"),
        ("lora", {"use_dora": True}, "dora"),
        ("IA3", {}, "ia3"),
        ("HIRA", {}, "hira"),
        ("HUT", {}, "hut"),
    ],
)
def test_each_family_claims_its_peft_configs(peft_type, extra, family):
    raw = {"peft_type": peft_type, "target_modules": TARGETS, **extra}
    assert method_for_peft_type(peft_type, raw).name == family
    method, cfg = parse_config(raw)
    assert method.name == family and type(cfg) is method.config_cls


def test_unknown_peft_type_names_the_field():
    with pytest.raises(ConfigError) as e:
        parse_config({"peft_type": "PROMPT_TUNING", "target_modules": TARGETS})
    assert e.value.where == "peft_type" and "IA3" in str(e.value)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"peft_type": "IA3", "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3", "fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3", "exclude_modules": ["q_proj"]}, "exclude_modules"),
        ({"peft_type": "IA3", "some_future_field": 1}, "some_future_field"),
        ({"peft_type": "HIRA", "rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"peft_type": "HIRA", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"peft_type": "HIRA", "r": 0}, "r"),
        ({"peft_type": "LORA", "use_dora": True, "rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"peft_type": "LORA", "use_dora": True, "bias": "all"}, "bias"),
        ({"peft_type": "LORA", "use_dora": True, "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "LORA", "use_dora": "yes"}, "use_dora"),
    ],
)
def test_features_not_honoured_are_refused_by_name(raw, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"target_modules": TARGETS, **raw})
    assert e.value.where == field, str(e.value)


def _served(method, cfg, params, x, weight, bias):
    """Two slots (the adapter and a second random one), rows alternating, as the engine groups them."""
    extra = {"bias": bias} if method.prepare_uses_bias else {}
    other = {k: v * 1.1 for k, v in params.items()}
    from server.methods import stack_prepared

    table = stack_prepared([method.prepare(cfg, p, weight, **extra) for p in (params, other)])
    rows = torch.arange(x.shape[0])
    group = Group(method, method.signature(cfg, *weight.shape), table, rows, rows % 2)
    return batched_linear(x, weight, bias, [group])[::2]


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_is_peft_formula_on_either_side_with_a_bias(feedforward):
    """PEFT: output side ``l ⊙ (x Wᵀ + b)`` (the bias scaled too), input side ``(l ⊙ x) Wᵀ + b``."""
    method = get_method("ia3")
    cfg = method.parse_config(
        {
            "peft_type": "IA3",
            "target_modules": ["up_proj"],
            "feedforward_modules": ["up_proj"] if feedforward else [],
        }
    )
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 24, generator=g), torch.randn(48, generator=g)
    shape = method.module_specs(cfg, "model.layers.0.mlp.up_proj", 48, 24)["ia3_l"].shape
    assert shape == ((1, 24) if feedforward else (48, 1))
    params = {"ia3_l": 1.0 + 0.3 * torch.randn(shape, generator=g)}
    x = torch.randn(6, 24, generator=g)
    lam = params["ia3_l"].flatten()
    peft = (x * lam) @ weight.T + bias if feedforward else (x @ weight.T + bias) * lam
    _close(_served(method, cfg, params, x, weight, bias), peft[::2], 24)
    w_m, b_m = method.merged_weight(cfg, params, weight, bias)
    _close(x @ w_m.T + b_m, peft, 24)
    w_r, b_r = method.reference_weight(cfg, params, weight, bias)
    _close(x @ w_r.T + b_r, peft, 24)


def test_hira_is_w_times_one_plus_ba():
    method = get_method("hira")
    cfg = method.parse_config({"peft_type": "HIRA", "target_modules": TARGETS, "r": 3})
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    params = method.init_params(cfg, weight, "random", g)
    x = torch.randn(6, 48, generator=g)
    peft = x @ weight.T + bias + x @ (weight * (params["hira_B"] @ params["hira_A"])).T
    _close(_served(method, cfg, params, x, weight, bias), peft[::2], 48 * 4)
    w_m, b_m = method.merged_weight(cfg, params, weight, bias)
    _close(x @ w_m.T + b_m, peft, 48 * 4)
    assert method.serving_cost(method.signature(cfg, 24, 48)) == "gemm"  # served merged


def test_dora_is_magnitude_over_row_norm():
    """PEFT's DoRA for nn.Linear: ``m / ‖W + s·B A‖`` per output row, the bias not rescaled."""
    method = get_method("dora")
    cfg = method.parse_config(
        {"peft_type": "LORA", "use_dora": True, "target_modules": TARGETS, "r": 4, "lora_alpha": 16}
    )
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    params = method.init_params(cfg, weight, "random", g)
    x = torch.randn(6, 48, generator=g)
    w = weight + (16 / 4) * params["lora_B"] @ params["lora_A"]
    c = params["lora_magnitude_vector"] / w.norm(dim=1)
    peft = (
        (c - 1) * (x @ weight.T)
        + c * ((x @ params["lora_A"].T) @ params["lora_B"].T) * 4
        + x @ weight.T
        + bias
    )
    _close(_served(method, cfg, params, x, weight, bias), peft[::2], 48 * 4)
    w_m, b_m = method.merged_weight(cfg, params, weight, bias)
    _close(x @ w_m.T + b_m, peft, 48 * 4)
    assert torch.equal(b_m, bias)
