"""FourierFT against PEFT's own layers: the spectral positions PEFT draws from ``random_loc_seed``,
the dense reference, PEFT's ifft2 merge and the batched real-FFT path on even and odd sides (the
half-spectrum bookkeeping differs), PEFT's per-module n, refusals by name."""

from __future__ import annotations

import pytest
import torch

from server.methods import (
    Adapter,
    ConfigError,
    Group,
    adapted_forward,
    batched_linear,
    get_method,
    parse_config,
    stack_prepared,
)
from server.methods.fourierft import peft_positions

from .peft_net import LinearNet, assert_within_rounding

# Even and odd sides: DC and Nyquist bins (real in a half spectrum) and mirrored bins all occur.
SIDES = {"q_proj": (24, 24), "k_proj": (8, 24), "up_proj": (9, 7), "down_proj": (6, 11)}


def _peft_model(seed: int = 0, **config):
    import peft

    model = peft.get_peft_model(
        LinearNet(SIDES, seed), peft.FourierFTConfig(target_modules=list(SIDES), **config)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fourierft_spectrum" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _config(model) -> dict:
    return model.peft_config["default"].to_dict() | {"target_modules": list(SIDES)}


def _layers(model):
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "fourierft_spectrum"):
            yield path, module


@pytest.mark.parametrize(("seed", "n", "scaling"), [(777, 30, 150.0), (0, 6, -3.0), (2**40 + 5, 54, 20.0)])
def test_positions_reference_merge_and_batched_path_are_peft_s(seed, n, scaling):
    model = _peft_model(n_frequency=n, random_loc_seed=seed, scaling=scaling)
    method, cfg = parse_config(_config(model))
    assert method.name == "fourierft"
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    for path, layer in _layers(model):
        base = layer.get_base_layer()
        w, b = base.weight.detach(), base.bias.detach()
        out_f, in_f = w.shape
        u, v = peft_positions(cfg, out_f, in_f)
        assert torch.equal(torch.stack([u, v]), layer.indices["default"]), path
        xs = x[:, :in_f]
        params = {"fourierft_spectrum": layer.fourierft_spectrum["default"].detach()}
        with torch.no_grad():
            expected = layer(xs)
            peft_delta = layer.get_delta_weight("default")
        n_terms = in_f + out_f + n
        w_ref, b_ref = method.reference_weight(cfg, params, w, b)
        assert_within_rounding(xs @ w_ref.T + b_ref, expected, n_terms)
        w_m, _ = method.merged_weight(cfg, params, w, b)
        assert torch.equal(w_m - w, (w + peft_delta) - w)  # PEFT's own ifft2, bit for bit
        other = method.init_params(cfg, w, "random", torch.Generator().manual_seed(5))
        table = stack_prepared([method.prepare(cfg, params, w), method.prepare(cfg, other, w)])
        group = Group(
            method, method.signature(cfg, out_f, in_f), table, torch.arange(5), torch.tensor([0, 1] * 2 + [0])
        )
        y = batched_linear(xs, w, b, [group])
        assert_within_rounding(y[0::2], expected[0::2], n_terms)
        w_o, _ = method.reference_weight(cfg, other, w, b)
        assert_within_rounding(y[1::2], xs[1::2] @ w_o.T + b, n_terms)
        assert_within_rounding(adapted_forward(method, cfg, params, xs, w, b), expected, n_terms)
        assert (expected - base(xs)).abs().max() > 1e-3 * abs(scaling), path


def test_n_frequency_pattern_is_peft_s_and_a_peft_folder_loads(tmp_path):
    pattern = {"q_proj": 40, "layers.1.up_proj": 3, "layers.0.down_proj": 66}
    model = _peft_model(n_frequency=10, n_frequency_pattern=pattern, random_loc_seed=11)
    model.save_pretrained(tmp_path)
    shapes = {path: tuple(layer.get_base_layer().weight.shape) for path, layer in _layers(model)}
    adapter = Adapter.load(tmp_path, shapes)
    assert adapter.family == "fourierft"
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(4))
    seen = set()
    for path, layer in _layers(model):
        cfg = adapter.config_for(path)
        assert cfg.n_frequency == layer.fourierft_n_frequency["default"], path
        base = layer.get_base_layer()
        u, v = peft_positions(cfg, *base.weight.shape)
        assert torch.equal(torch.stack([u, v]), layer.indices["default"]), path
        seen.add(cfg.n_frequency)
        xs = x[:, : base.in_features]
        w_ref, b_ref = adapter.method.reference_weight(cfg, adapter.modules[path], base.weight, base.bias)
        with torch.no_grad():
            assert_within_rounding(xs @ w_ref.T + b_ref, layer(xs), 24 + 24 + 66)
    assert seen == {10, 40, 3, 66}


def test_more_frequencies_than_positions_names_the_field():
    raw = {"peft_type": "FOURIERFT", "target_modules": ["k_proj"], "n_frequency": 193}
    _, cfg = parse_config(raw)
    with pytest.raises(ConfigError) as e:
        cfg.check_shape("model.layers.0.self_attn.k_proj", 8, 24)
    assert e.value.where == "n_frequency"
    _, cfg = parse_config(raw | {"n_frequency": 10, "n_frequency_pattern": {"k_proj": 200}})
    path = "model.layers.0.self_attn.k_proj"
    with pytest.raises(ConfigError) as e:
        cfg.for_module(path).check_shape(path, 8, 24)
    assert e.value.where == "n_frequency_pattern"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"bias": "fourier_only"}, "bias"),
        ({"bias": "all"}, "bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"exclude_modules": ["q_proj"]}, "exclude_modules"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"random_loc_seed": None}, "random_loc_seed"),
        ({"random_loc_seed": 2**64}, "random_loc_seed"),
        ({"n_frequency": 0}, "n_frequency"),
        ({"scaling": float("nan")}, "scaling"),
        ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern.q_proj"),
        ({"n_frequency_pattern": {"[": 4}}, "n_frequency_pattern"),
        ({"init_weights": "gaussian"}, "init_weights"),
        ({"some_future_field": 1}, "some_future_field"),
    ],
)
def test_features_not_honoured_are_refused_by_name(extra, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"peft_type": "FOURIERFT", "target_modules": ["q_proj"], **extra})
    assert e.value.where == field


def test_serving_cost_is_gemm_only_when_the_spectrum_is_nearly_dense():
    method = get_method("fourierft")
    for n, cost in ((20, "cheap"), (64, "cheap"), (130, "gemm")):
        _, cfg = parse_config({"peft_type": "FOURIERFT", "target_modules": ["q"], "n_frequency": n})
        assert method.serving_cost(method.signature(cfg, 24, 24)) == cost  # 4·n_pad vs 576


def test_train_init_follows_peft_s_init_weights():
    method = get_method("fourierft")
    g = torch.Generator().manual_seed(0)
    for init, nonzero in ((False, True), (True, False)):
        _, cfg = parse_config(
            {"peft_type": "FOURIERFT", "target_modules": ["q"], "init_weights": init, "n_frequency": 50}
        )
        c = method.init_params(cfg, torch.randn(24, 24), "train", g)["fourierft_spectrum"]
        assert bool(c.any()) == nonzero and c.shape == (50,)
