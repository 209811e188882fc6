"""OFT and BOFT against PEFT's own layers: the dense reference, the merge and the batched path each
compute what a PEFT-wrapped ``nn.Linear`` computes (float32, random non-zero weights); PEFT's block
size adjustment and shape checks; the Cayley–Neumann series term by term; refusals by field name."""

from __future__ import annotations

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
    parse_config,
    stack_prepared,
)
from tests.peft_butterfly import butterfly_peft

IN, OUT = 24, 12
EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def butterflies():
    with butterfly_peft():
        yield


def _close(actual, expected, n_terms: int):
    """float32 worst-case rounding: eps per term of the reductions, relative to the output scale."""
    tol = 4 * n_terms * EPS * expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


def _peft_linear(kind: str, seed: int, **kw):
    """A PEFT model around one random ``nn.Linear(IN, OUT)`` with random non-zero adapter tensors;
    returns (model, our params cloned before PEFT's first forward, W, b)."""
    import peft

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT))
    config = (
        peft.OFTConfig(target_modules=["0"], **kw)
        if kind == "oft"
        else peft.BOFTConfig(target_modules=["0"], **kw)
    )
    model = peft.get_peft_model(model, config).eval()
    layer = model.base_model.model[0]
    with torch.no_grad():
        if kind == "oft":
            layer.oft_R["default"].weight.normal_(0.0, 0.3)
            params = {"oft_R": layer.oft_R["default"].weight.detach().clone()}
        else:
            layer.boft_R["default"].normal_(0.0, 0.3)
            layer.boft_s["default"].normal_(1.0, 0.2)
            params = {k: getattr(layer, k)["default"].detach().clone() for k in ("boft_R", "boft_s")}
    return model, params, layer.base_layer.weight.detach(), layer.base_layer.bias.detach()


OFT_CONFIGS = [
    {"oft_block_size": 4, "r": 0},
    {"oft_block_size": 8, "r": 0, "use_cayley_neumann": False},
    {"oft_block_size": 0, "r": 3, "num_cayley_neumann_terms": 7},
    {"oft_block_size": 6, "r": 0, "block_share": True},
    {"oft_block_size": 4, "r": 0, "coft": True, "eps": 0.5},  # clips: the blocks' norms are about 2
    {"oft_block_size": 6, "r": 0, "block_share": True, "coft": True, "eps": 0.3, "use_cayley_neumann": False},
    {"oft_block_size": 5, "r": 0},  # not a divisor of 24: PEFT adjusts it (to 4), so do we
    {"oft_block_size": 0, "r": 5},  # likewise the block count (to 4)
    {"oft_block_size": 32, "r": 0},  # above in_features: one block of 24
]
BOFT_CONFIGS = [
    {"boft_block_size": 4},
    {"boft_block_size": 4, "boft_n_butterfly_factor": 2},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
    {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2},
    {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3},
]
CASES = [("oft", c) for c in OFT_CONFIGS] + [("boft", c) for c in BOFT_CONFIGS]


@pytest.mark.parametrize(("kind", "kw"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_reference_merge_and_batched_path_compute_peft_forward(butterflies, kind, kw):
    model, params, weight, bias = _peft_linear(kind, seed=len(str(kw)), **kw)
    method = get_method(kind)
    raw = {"peft_type": kind.upper(), "target_modules": ["0"], "peft_version": "0.21.2", **kw}
    cfg = method.parse_config(raw)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        k: s.shape for k, s in method.param_specs(cfg, OUT, IN).items()
    }
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    n_terms = IN + 8 * kw.get("boft_n_butterfly_factor", kw.get("num_cayley_neumann_terms", 5))
    ref_w, ref_b = method.reference_weight(cfg, params, weight, bias)
    _close(x @ ref_w.T + ref_b, want, n_terms)
    merged_w, merged_b = method.merged_weight(cfg, params, weight, bias)
    _close(x @ merged_w.T + merged_b, want, n_terms)
    _close(adapted_forward(method, cfg, params, x, weight, bias), want, n_terms)
    # the serving path with several slots: rows of this adapter among rows of an identity one
    other = method.init_params(cfg, weight, "identity", torch.Generator().manual_seed(0))
    table = stack_prepared([method.prepare(cfg, other, weight), method.prepare(cfg, params, weight)])
    group = Group(
        method, method.signature(cfg, OUT, IN), table, torch.tensor([1, 3, 4]), torch.tensor([1, 0, 1])
    )
    y = batched_linear(x, weight, bias, [group])
    _close(y[[1, 4]], want[[1, 4]], n_terms)
    _close(y[[0, 2, 3, 5]], x[[0, 2, 3, 5]] @ weight.T + bias, n_terms)


@pytest.mark.parametrize("terms", range(8))
def test_cayley_neumann_series_is_peft_0_18s_for_every_length(terms):
    """Each length of the series, against PEFT; t = 3 and t = 4 are the same series in PEFT 0.18+."""
    kw = {"oft_block_size": 6, "r": 0, "num_cayley_neumann_terms": terms}
    model, params, weight, bias = _peft_linear("oft", seed=terms, **kw)
    method = get_method("oft")
    cfg = method.parse_config({"peft_type": "OFT", "target_modules": ["0"], "peft_version": "0.18.0", **kw})
    x = torch.randn(4, IN)
    with torch.no_grad():
        want = model(x)
    ref_w, _ = method.reference_weight(cfg, params, weight, bias)
    _close(x @ ref_w.T + bias, want, IN + 8 * terms)
    _close(adapted_forward(method, cfg, params, x, weight, bias), want, IN + 8 * terms)
    if terms <= 1:  # the series is I: the adapter does nothing
        _close(want, x @ weight.T + bias, IN)
    else:
        assert (want - (x @ weight.T + bias)).abs().max() > 1e-3


def test_exact_cayley_blocks_are_orthogonal_and_the_series_is_not():
    """The exact transform is orthogonal; PEFT's truncated series only approximately (the reason it
    is a separate, version-dependent variant)."""
    method = get_method("oft")
    base = {
        "peft_type": "OFT",
        "target_modules": ["0"],
        "oft_block_size": 6,
        "r": 0,
        "peft_version": "0.21.2",
    }
    params = {"oft_R": 0.3 * torch.randn(4, 15, generator=torch.Generator().manual_seed(0))}
    weight = torch.randn(OUT, IN)
    eye = torch.eye(6)
    exact = method.prepare(method.parse_config({**base, "use_cayley_neumann": False}), params, weight)["R"]
    series = method.prepare(method.parse_config(base), params, weight)["R"]
    assert (exact @ exact.transpose(1, 2) - eye).abs().max() < 16 * EPS
    assert (series @ series.transpose(1, 2) - eye).abs().max() > 1e-3


OFT_OK = {"peft_type": "OFT", "oft_block_size": 8, "r": 0, "peft_version": "0.21.2"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"peft_type": "OFT", "r": 8}, "oft_block_size"),  # PEFT < 0.14: no oft_block_size
        ({"peft_type": "OFT", "r": 4, "oft_block_size": 8}, "oft_block_size"),  # both set
        ({"peft_type": "OFT", "r": 0, "oft_block_size": 0}, "oft_block_size"),  # neither
        ({"peft_type": "OFT", "oft_block_size": 8, "r": 0}, "peft_version"),  # Neumann, version unknown
        ({"peft_type": "OFT", "oft_block_size": 8, "r": 0, "peft_version": "0.17.1"}, "peft_version"),
        ({"peft_type": "OFT", "oft_block_size": 8, "r": 0, "peft_version": "0.18.0.dev0"}, "peft_version"),
        (
            {
                "peft_type": "OFT",
                "oft_block_size": 8,
                "r": 0,
                "use_cayley_neumann": False,
                "peft_version": "0.15.0",
            },
            "peft_version",
        ),
        ({"peft_type": "OFT", "oft_block_size": 8, "r": 0, "peft_version": "main"}, "peft_version"),
        ({**OFT_OK, "bias": "oft_only"}, "bias"),
        ({**OFT_OK, "fan_in_fan_out": True}, "fan_in_fan_out"),
        ({**OFT_OK, "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({**OFT_OK, "layers_to_transform": [0]}, "layers_to_transform"),
        ({**OFT_OK, "layers_pattern": "layers"}, "layers_pattern"),
        ({**OFT_OK, "exclude_modules": ["q"]}, "exclude_modules"),
        ({**OFT_OK, "coft": "yes"}, "coft"),
        ({**OFT_OK, "eps": -1.0}, "eps"),
        ({**OFT_OK, "module_dropout": 1.0}, "module_dropout"),
        ({**OFT_OK, "num_cayley_neumann_terms": 1000}, "num_cayley_neumann_terms"),
        ({**OFT_OK, "some_future_field": 1}, "some_future_field"),
        ({"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 6}, "boft_block_num"),
        ({"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 0}, "boft_block_num"),
        ({"peft_type": "BOFT", "boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
        ({"peft_type": "BOFT", "bias": "boft_only"}, "bias"),
        ({"peft_type": "BOFT", "fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "BOFT", "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "BOFT", "layers_pattern": "layers"}, "layers_pattern"),
        ({"peft_type": "BOFT", "exclude_modules": "q"}, "exclude_modules"),
    ],
)
def test_features_not_honoured_are_refused_by_name(raw, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"target_modules": ["q_proj"], **raw})
    assert e.value.where == field, str(e.value)


def test_versions_served():
    """Exact Cayley from PEFT 0.16 (also written without peft_version, as 0.16/0.17 did), the
    series from 0.18; bookkeeping and training-only fields accepted."""
    base = {"peft_type": "OFT", "target_modules": ["q_proj"], "oft_block_size": 8, "r": 0}
    for extra in (
        {"use_cayley_neumann": False},
        {"use_cayley_neumann": False, "peft_version": "0.16.0"},
        {"peft_version": "0.18.0"},
        {"peft_version": "0.18.1.dev0"},
        {"use_cayley_neumann": False, "peft_version": "0.17.0rc1"},
        {
            "peft_version": "0.19.0@abc123",
            "module_dropout": 0.1,
            "init_weights": False,
            "task_type": "CAUSAL_LM",
        },
    ):
        method, _ = parse_config({**base, **extra})
        assert method.name == "oft"
    method, _ = parse_config({"peft_type": "BOFT", "target_modules": ["q_proj"], "boft_dropout": 0.1})
    assert method.name == "boft"


@pytest.mark.parametrize(
    ("raw", "in_f", "field"),
    [
        ({"boft_block_size": 5}, 24, "boft_block_size"),
        ({"boft_block_size": 0, "boft_block_num": 5}, 24, "boft_block_num"),
        ({"boft_block_size": 4, "boft_n_butterfly_factor": 3}, 24, "boft_n_butterfly_factor"),  # 16 ∤ 24
        (
            {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 3},
            24,
            "boft_n_butterfly_factor",
        ),
        ({"boft_block_size": 3, "boft_n_butterfly_factor": 2}, 24, "boft_block_size"),  # odd block size
    ],
)
def test_boft_shapes_peft_refuses_are_refused(butterflies, raw, in_f, field):
    import peft

    method = get_method("boft")
    cfg = method.parse_config({"peft_type": "BOFT", "target_modules": ["0"], **raw})
    with pytest.raises(ConfigError) as e:
        cfg.check_shape("0", OUT, in_f)
    assert e.value.where == field
    with pytest.raises(ValueError):  # and PEFT refuses the same
        peft.get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(in_f, OUT)), peft.BOFTConfig(target_modules=["0"], **raw)
        )


def test_oft_block_size_one_is_refused():
    cfg = get_method("oft").parse_config(
        {
            "peft_type": "OFT",
            "target_modules": ["0"],
            "r": 24,
            "oft_block_size": 0,
            "use_cayley_neumann": False,
        }
    )
    with pytest.raises(ConfigError) as e:
        cfg.check_shape("0", OUT, IN)
    assert e.value.where == "r"


def test_boft_file_with_one_factor_for_a_butterfly_config_is_refused_by_its_shape():
    """PEFT without its CUDA extension saves one factor whatever the config says: such a file is
    computed differently by PEFT on different machines, and refused, naming the tensor."""
    method = get_method("boft")
    cfg = method.parse_config(
        {
            "peft_type": "BOFT",
            "target_modules": ["q_proj"],
            "boft_block_size": 4,
            "boft_n_butterfly_factor": 2,
        }
    )
    key = "base_model.model.q_proj"
    tensors = {f"{key}.boft_R": torch.randn(1, 6, 4, 4), f"{key}.boft_s": torch.ones(OUT, 1)}
    with pytest.raises(WeightsError) as e:
        Adapter.from_state_dict(method, cfg, tensors, {"q_proj": (OUT, IN)})
    assert e.value.where == f"{key}.boft_R"


@pytest.mark.parametrize(
    ("kind", "raw", "shape", "cost"),
    [
        ("oft", {"oft_block_size": 4, "r": 0}, (8, 24), "cheap"),  # in·bs = 96 < out·in = 192
        ("oft", {"oft_block_size": 8, "r": 0}, (8, 24), "gemm"),  # in·bs = out·in: merged
        ("oft", {"oft_block_size": 0, "r": 1}, (48, 24), "cheap"),  # one block of 24 < out 48
        ("boft", {"boft_block_size": 4}, (8, 24), "cheap"),  # 96 + 8 < 192
        ("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}, (8, 24), "gemm"),  # 200 >= 192
        ("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}, (24, 24), "cheap"),
    ],
)
def test_served_merged_where_on_the_fly_is_no_cheaper_than_a_dense_update(kind, raw, shape, cost):
    method = get_method(kind)
    cfg = method.parse_config(
        {"peft_type": kind.upper(), "target_modules": ["0"], "peft_version": "0.21.2", **raw}
    )
    assert method.serving_cost(method.signature(cfg, *shape)) == cost
