"""PEFT types served through a family's math (IA3, HiRA, DoRA): the PEFT-type mapping, their
formulas written out against PEFT's, and PEFT features they do not honour refused by name."""

from __future__ import annotations

import json

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
        ("VERA", {}, "vera"),
        ("HRA", {}, "hra"),
        ("LOHA", {}, "loha"),
        ("LOKR", {}, "lokr"),
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
        ({"peft_type": "LORA", "use_dora": True, "lora_bias": True}, "lora_bias"),
        ({"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj"),
        ({"peft_type": "LORA", "rank_pattern": {"(": 2}}, "rank_pattern"),
        ({"peft_type": "LORA", "use_dora": True, "bias": "all"}, "bias"),
        ({"peft_type": "LORA", "use_dora": True, "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "LORA", "use_dora": "yes"}, "use_dora"),
        ({"peft_type": "VERA", "save_projection": False}, "save_projection"),
        ({"peft_type": "VERA", "bias": "vera_only"}, "bias"),
        ({"peft_type": "VERA", "layers_to_transform": [1]}, "layers_to_transform"),
        ({"peft_type": "HRA", "bias": "hra_only"}, "bias"),
        ({"peft_type": "LOHA", "rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"peft_type": "LOHA", "r": 65}, "r"),
        ({"peft_type": "LOKR", "decompose_factor": -2}, "decompose_factor"),
        ({"peft_type": "LOKR", "alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
        ({"peft_type": "HRA", "layers_pattern": "layers"}, "layers_pattern"),
        ({"peft_type": "HRA", "apply_GS": "yes"}, "apply_GS"),
    ],
)
def test_features_not_honoured_are_refused_by_name(raw, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"target_modules": TARGETS, **raw})
    assert e.value.where == field, str(e.value)


@pytest.mark.parametrize("peft_type", ["LORA", "IA3", "HIRA", "VERA", "HRA", "LOHA", "LOKR"])
def test_auto_mapping_is_data_of_two_keys_for_every_peft_type(peft_type):
    """PEFT records the base model class in ``auto_mapping``; it is never imported, and every type
    refuses anything else riding along in it (one shared check, LoRA's)."""
    ok = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama"}
    parse_config({"peft_type": peft_type, "target_modules": TARGETS, "auto_mapping": ok})
    bad = {**ok, "evil": "os.system"}
    with pytest.raises(ConfigError) as e:
        parse_config({"peft_type": peft_type, "target_modules": TARGETS, "auto_mapping": bad})
    assert e.value.where == "auto_mapping" and "evil" in str(e.value)


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


def _vera_folder(tmp_path, r: int = 4):
    """A VeRA adapter over MODULE_SHAPES written as PEFT lays it out: the projections stored once."""
    from safetensors.torch import save_file

    from .cases import MODULE_SHAPES

    g = torch.Generator().manual_seed(5)
    max_out = max(o for o, _ in MODULE_SHAPES.values())
    max_in = max(i for _, i in MODULE_SHAPES.values())
    tensors = {
        "base_model.vera_A": torch.randn(r, max_in, generator=g),
        "base_model.vera_B": torch.randn(max_out, r, generator=g),
    }
    for path, (out_f, _) in MODULE_SHAPES.items():
        tensors[f"base_model.model.{path}.vera_lambda_b"] = torch.randn(out_f, generator=g)
        tensors[f"base_model.model.{path}.vera_lambda_d"] = torch.randn(r, generator=g)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    cfg = {"peft_type": "VERA", "target_modules": TARGETS, "r": r, "save_projection": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def test_vera_slices_the_shared_projections_and_round_trips(tmp_path):
    from server.methods import Adapter

    from .cases import MODULE_SHAPES

    tensors = _vera_folder(tmp_path)
    adapter = Adapter.load(tmp_path, MODULE_SHAPES)
    assert adapter.family == "vera" and set(adapter.shared) == {"base_model.vera_A", "base_model.vera_B"}
    g = torch.Generator().manual_seed(6)
    for path, (out_f, in_f) in MODULE_SHAPES.items():
        params = adapter.modules[path]
        weight, bias = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
        x = torch.randn(6, in_f, generator=g)
        a = tensors["base_model.vera_A"][:, :in_f]
        b = tensors["base_model.vera_B"][:out_f, :]
        peft = x @ weight.T + bias + params["vera_lambda_b"] * ((params["vera_lambda_d"] * (x @ a.T)) @ b.T)
        _close(_served(adapter.method, adapter.config, params, x, weight, bias), peft[::2], 4 * in_f)
        w_m, b_m = adapter.method.merged_weight(adapter.config, params, weight, bias)
        _close(x @ w_m.T + b_m, peft, 4 * in_f)
    # Saved again: the projections once, under PEFT's names, byte-identical tensors.
    again = adapter.state_dict()
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert adapter.nbytes() == sum(t.numel() * 4 for t in tensors.values())
    assert adapter.trainable_count() == sum(o + 4 for o, _ in MODULE_SHAPES.values())


def test_vera_without_its_projections_names_the_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from server.methods import Adapter, WeightsError

    from .cases import MODULE_SHAPES

    _vera_folder(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["base_model.vera_B"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(WeightsError) as e:
        Adapter.load(tmp_path, MODULE_SHAPES)
    assert e.value.where == "base_model.vera_B"


def test_vera_gradients_reach_the_vectors_only():
    from server.methods import adapted_forward

    method = get_method("vera")
    cfg = method.parse_config({"peft_type": "VERA", "target_modules": TARGETS, "r": 4})
    g = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    params = method.init_params(cfg, weight, "random", g)
    for name, spec in method.param_specs(cfg, 24, 48).items():
        params[name].requires_grad_(spec.trainable)
    y = adapted_forward(method, cfg, params, torch.randn(3, 48, generator=g), weight, bias)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    assert params["vera_lambda_b"].grad.abs().sum() > 0 and params["vera_lambda_d"].grad.abs().sum() > 0
    assert params["vera_A"].grad is None and params["vera_B"].grad is None
    ident = method.init_params(cfg, weight, "identity", g)  # PEFT's: λ_b = 0
    x = torch.randn(5, 48, generator=g)
    _close(adapted_forward(method, cfg, ident, x, weight, bias), x @ weight.T + bias, 48)


def test_hra_r1_is_one_sided_ether_with_one_block():
    hra, ether = get_method("hra"), get_method("ether")
    h_cfg = hra.parse_config({"peft_type": "HRA", "target_modules": TARGETS, "r": 1})
    e_cfg = ether.parse_config(
        {"peft_type": "ETHER", "target_modules": TARGETS, "variant": "ether", "side": "in", "n_blocks": 1}
    )
    g = torch.Generator().manual_seed(8)
    weight, bias = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    u = torch.randn(48, 1, generator=g)
    w_h, _ = hra.merged_weight(h_cfg, {"hra_u": u}, weight, bias)
    w_e, _ = ether.merged_weight(e_cfg, {"ether_u_in": u.T.clone()}, weight, bias)
    _close(w_h, w_e, 48)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_hra_is_peft_product_of_reflections(apply_gs):
    """PEFT: W' = W H, H = Π_i (I − 2 û_i û_iᵀ) in order, or I − 2 Q Qᵀ after Gram–Schmidt."""
    method = get_method("hra")
    cfg = method.parse_config({"peft_type": "HRA", "target_modules": TARGETS, "r": 3, "apply_GS": apply_gs})
    g = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    u = torch.randn(48, 3, generator=g)
    if apply_gs:
        q, _ = torch.linalg.qr(u)  # Gram–Schmidt up to the signs of the columns, which H ignores
        h = torch.eye(48) - 2 * q @ q.T
    else:
        h = torch.eye(48)
        for i in range(3):
            ui = u[:, i : i + 1] / u[:, i].norm()
            h = h @ (torch.eye(48) - 2 * ui @ ui.T)
    x = torch.randn(6, 48, generator=g)
    peft = x @ (weight @ h).T + bias
    _close(_served(method, cfg, {"hra_u": u}, x, weight, bias), peft[::2], 48 * 6)
    w_m, b_m = method.merged_weight(cfg, {"hra_u": u}, weight, bias)
    _close(x @ w_m.T + b_m, peft, 48 * 6)
    assert method.hooks(method.signature(cfg, 24, 48)) == {"pre"}  # on the fly, before the GEMM


def test_hra_column_without_direction_is_refused_naming_the_tensor():
    from server.methods import WeightsError

    method = get_method("hra")
    cfg = method.parse_config({"peft_type": "HRA", "target_modules": TARGETS, "r": 2})
    u = torch.randn(24, 2)
    u[:, 1] = 0.0
    with pytest.raises(WeightsError) as e:
        method.check_params(cfg, "model.layers.0.self_attn.q_proj", {"hra_u": u}, 24, 24)
    assert e.value.where.endswith("q_proj.hra_u")


@pytest.mark.parametrize(
    ("dim", "factor"), [(256, -1), (128, -1), (127, -1), (128, 4), (96, 5), (64, 0), (24, 8)]
)
def test_lokr_factorization_is_peft_s(dim, factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from server.methods.lokr import factorization

    assert factorization(dim, factor) == peft_factorization(dim, factor)
