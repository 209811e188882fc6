"""C3A against PEFT's own layers: the dense reference, the merge and the batched FFT path equal
PEFT's output with random non-zero kernels; PEFT's per-module block sizes; refusals by name."""

from __future__ import annotations

import pytest
import torch

from server.methods import (
    Adapter,
    ConfigError,
    Group,
    batched_linear,
    get_method,
    parse_config,
    stack_prepared,
)

from .peft_net import LinearNet, assert_within_rounding

SIDES = {"q_proj": (24, 24), "k_proj": (8, 24), "up_proj": (48, 24), "down_proj": (24, 48)}


def _peft_model(seed: int = 0, **config):
    import peft

    model = peft.get_peft_model(LinearNet(SIDES, seed), peft.C3AConfig(target_modules=list(SIDES), **config))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c3a_kernel" in name:  # entries of ΔW are kernel / in: O(1) kernels move W visibly
                p.copy_(torch.randn(p.shape, generator=g) * 3)
    return model.eval()


def _config(model) -> dict:
    return model.peft_config["default"].to_dict() | {"target_modules": list(SIDES)}


def _layers(model):
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "c3a_kernel"):
            yield path, module


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_reference_merge_and_batched_path_are_peft_s_layer(block_size):
    model = _peft_model(block_size=block_size)
    method, cfg = parse_config(_config(model))
    assert method.name == "c3a"
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    for path, layer in _layers(model):
        base = layer.get_base_layer()
        w, b = base.weight.detach(), base.bias.detach()
        xs = x[:, : w.shape[1]]
        params = {"c3a_kernel": layer.c3a_kernel["default"].detach()}
        with torch.no_grad():
            expected = layer(xs)
            peft_delta = layer.get_delta_weight("default")
        n_terms = w.shape[1] + 2 * block_size
        w_ref, b_ref = method.reference_weight(cfg, params, w, b)
        assert_within_rounding(xs @ w_ref.T + b_ref, expected, n_terms)
        w_m, _ = method.merged_weight(cfg, params, w, b)
        assert_within_rounding(w_m - w, peft_delta, 2)  # the same ΔW entries, gathered instead of PEFT's FFTs
        # Batched: this adapter's rows beside another adapter's, each row its own slot.
        other = method.init_params(cfg, w, "random", torch.Generator().manual_seed(5))
        table = stack_prepared([method.prepare(cfg, params, w), method.prepare(cfg, other, w)])
        sig = method.signature(cfg, *w.shape)
        group = Group(method, sig, table, torch.arange(5), torch.tensor([0, 1, 0, 1, 0]))
        y = batched_linear(xs, w, b, [group])
        assert_within_rounding(y[0::2], expected[0::2], n_terms)
        w_o, _ = method.reference_weight(cfg, other, w, b)
        assert_within_rounding(y[1::2], xs[1::2] @ w_o.T + b, n_terms)
        assert (expected - base(xs)).abs().max() > 0.1, path  # the adapter moves the output


def test_block_size_pattern_is_peft_s_and_a_peft_folder_loads(tmp_path):
    """PEFT's rule: the first key matching the end of the path after a dot, else the full path."""
    pattern = {"q_proj": 4, "layers.1.up_proj": 2, "layers.0.down_proj": 1, "layers.1.k_proj": 8}
    model = _peft_model(block_size=8, block_size_pattern=pattern)
    model.save_pretrained(tmp_path)
    shapes = {path: tuple(layer.get_base_layer().weight.shape) for path, layer in _layers(model)}
    adapter = Adapter.load(tmp_path, shapes)
    assert adapter.family == "c3a"
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(4))
    seen = set()
    for path, layer in _layers(model):
        cfg = adapter.config_for(path)
        assert cfg.block_size == layer.block_size["default"], path
        seen.add(cfg.block_size)
        base = layer.get_base_layer()
        xs = x[:, : base.in_features]
        w_ref, b_ref = adapter.method.reference_weight(cfg, adapter.modules[path], base.weight, base.bias)
        with torch.no_grad():
            assert_within_rounding(xs @ w_ref.T + b_ref, layer(xs), base.in_features + 16)
    assert seen == {1, 2, 4, 8}


def test_a_block_size_that_does_not_divide_names_its_field():
    method, cfg = parse_config({"peft_type": "C3A", "target_modules": ["q_proj"], "block_size": 16})
    with pytest.raises(ConfigError) as e:
        cfg.check_shape("model.layers.0.self_attn.q_proj", 24, 24)
    assert e.value.where == "block_size"
    raw = {"peft_type": "C3A", "target_modules": ["q_proj"], "block_size": 8}
    raw["block_size_pattern"] = {"q_proj": 5}
    method, cfg = parse_config(raw)
    path = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ConfigError) as e:
        cfg.for_module(path).check_shape(path, 24, 24)
    assert e.value.where == "block_size_pattern" and "block_size=5" in str(e.value)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"bias": "all"}, "bias"),
        ({"bias": "c3a_only"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"exclude_modules": ["q_proj"]}, "exclude_modules"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": "8"}, "block_size"),
        ({"block_size_pattern": {"q_proj": 0}}, "block_size_pattern.q_proj"),
        ({"block_size_pattern": {"(": 4}}, "block_size_pattern"),
        ({"init_weights": "orthogonal"}, "init_weights"),
        ({"auto_mapping": {"base_model_class": "X", "parent_library": "y", "code": "z"}}, "auto_mapping"),
        ({"some_future_field": 1}, "some_future_field"),
    ],
)
def test_features_not_honoured_are_refused_by_name(extra, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"peft_type": "C3A", "target_modules": ["q_proj"], **extra})
    assert e.value.where == field


def test_train_init_follows_peft_s_init_weights():
    method = get_method("c3a")
    weight = torch.randn(8, 24)
    g = torch.Generator().manual_seed(0)
    xavier, kaiming = (6 / 32) ** 0.5, 24**-0.5  # in = 24, out = 8

    def cfg_with(init):
        raw = {"peft_type": "C3A", "target_modules": ["k"], "block_size": 8, "init_weights": init}
        return method.parse_config(raw)

    for init, bound in (("xavier_uniform", xavier), (False, xavier), ("kaiming_uniform", kaiming)):
        k = method.init_params(cfg_with(init), weight, "train", g)["c3a_kernel"]
        assert k.abs().max() <= bound and k.abs().max() > bound / 2
    cfg = cfg_with(True)
    assert not method.init_params(cfg, weight, "train", g)["c3a_kernel"].any()


def test_gathered_and_segmented_slot_paths_agree():
    """The GPU path (per-row spectra) and the CPU one (rows regrouped per slot) are the same sums."""
    from server.methods.c3a import _gathered, _segmented

    g = torch.Generator().manual_seed(7)
    spec = torch.randn(3, 5, 4, 6, dtype=torch.complex64, generator=g)  # [S, K, n, m]
    xs = torch.randn(9, 5, 4, dtype=torch.complex64, generator=g)  # [R, K, n]
    slots = torch.tensor([2, 0, 2, 2, 1, 0, 2, 1, 2])
    expected = torch.stack(
        [xs[r].unsqueeze(1).matmul(spec[s]).squeeze(1) for r, s in enumerate(slots.tolist())]
    )
    for path in (_gathered, _segmented):
        got = path(xs, spec, slots)
        assert_within_rounding(got.real, expected.real, 4)
        assert_within_rounding(got.imag, expected.imag, 4)
