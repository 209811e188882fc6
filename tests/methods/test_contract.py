"""Contract checks run for every (family, config) case in cases.py, with non-zero parameters."""

from __future__ import annotations

import random

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

from .cases import CASE_IDS, CASES, MODULE_SHAPES, SHAPES, Case, merge_into


def _setup(case: Case, shape: tuple[int, int], seed: int, mode: str = "random"):
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    params = method.init_params(cfg, weight, mode, g)
    return method, cfg, weight, bias, params


def _ref_out(method, cfg, params, x, weight, bias):
    w2, b2 = method.reference_weight(cfg, params, weight, bias)
    return x @ w2.T + (b2 if b2 is not None else 0)


def _close(actual, expected, rel=1e-4):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x output scale {scale:.3g}"


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_mixed_batch_matches_reference_and_merge(shape_name):
    """Check 1: every family in one batch, plus rows with no adapter, against the dense oracle."""
    shape = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g)
    bias = torch.randn(shape[0], generator=g)
    # Two adapters per case so each table holds several slots; rows shuffled across families.
    adapters = []
    for i, case in enumerate(CASES * 2):
        method = get_method(case.family)
        cfg = method.parse_config(case.raw_config())
        params = method.init_params(cfg, weight, "random", torch.Generator().manual_seed(100 + i))
        adapters.append((method, cfg, params))
    owners = [None] * 5 + [a for a in range(len(adapters)) for _ in range(3)]
    random.Random(0).shuffle(owners)
    x = torch.randn(len(owners), shape[1], generator=g)

    by_sig: dict = {}
    for a, (method, cfg, _params) in enumerate(adapters):
        sig = method.signature(cfg, *shape)
        by_sig.setdefault((method.name, sig), []).append(a)
    groups = []
    for (_, sig), members in by_sig.items():
        method = adapters[members[0]][0]
        extra = {"bias": bias} if method.prepare_uses_bias else {}
        table = stack_prepared(
            [method.prepare(adapters[a][1], adapters[a][2], weight, **extra) for a in members]
        )
        rows = [r for r, o in enumerate(owners) if o in members]
        slots = [members.index(owners[r]) for r in rows]
        groups.append(Group(method, sig, table, torch.tensor(rows), torch.tensor(slots)))
    y = batched_linear(x, weight, bias, groups)

    for r, o in enumerate(owners):
        if o is None:
            _close(y[r], x[r] @ weight.T + bias, rel=1e-6)
            continue
        method, cfg, params = adapters[o]
        expected = _ref_out(method, cfg, params, x[r : r + 1], weight, bias)[0]
        _close(y[r], expected)
        w_m, b_m = method.merged_weight(cfg, params, weight, bias)
        _close(x[r] @ w_m.T + (b_m if b_m is not None else 0), expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_training_forward_matches_reference(case, shape_name):
    method, cfg, weight, bias, params = _setup(case, SHAPES[shape_name], 1)
    x = torch.randn(2, 5, SHAPES[shape_name][1])
    _close(
        adapted_forward(method, cfg, params, x, weight, bias), _ref_out(method, cfg, params, x, weight, bias)
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_identity_init_leaves_output_unchanged(case):
    """Check 2 (plain ETHER, HRA with odd r or GS have no identity: asking for one is an error).

    Within a few float32 ulps of the output: HRA's identity is a product of paired reflections
    (H H = I exactly in real arithmetic, each one rounds), the other families' is exact."""
    for shape in SHAPES.values():
        method = get_method(case.family)
        cfg = method.parse_config(case.raw_config())
        weight, bias = torch.randn(shape), torch.randn(shape[0])
        if case.config.get("variant") == "ether" or not case.identity:
            with pytest.raises(ConfigError):
                method.init_params(cfg, weight, "identity", torch.Generator().manual_seed(0))
            continue
        params = method.init_params(cfg, weight, "identity", torch.Generator().manual_seed(0))
        x = torch.randn(7, shape[1])
        base = x @ weight.T + bias
        ulps = 8 * torch.finfo(torch.float32).eps
        tol = max(1e-6, ulps * float(base.abs().max()))
        assert (adapted_forward(method, cfg, params, x, weight, bias) - base).abs().max() <= tol
        w2, b2 = method.merged_weight(cfg, params, weight, bias)
        assert (w2 - weight).abs().max() <= max(1e-6, ulps * float(weight.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_merged_linear_computes_the_reference(case, shape_name):
    """Check 3: a linear with the merged ``W'``, ``b'`` written into it computes ``W'x + b'``."""
    method, cfg, weight, bias, params = _setup(case, SHAPES[shape_name], 2)
    lin = torch.nn.Linear(SHAPES[shape_name][1], SHAPES[shape_name][0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    before_w = lin.weight.detach().clone()
    merge_into(lin, method, cfg, params)
    x = torch.randn(4, SHAPES[shape_name][1])
    assert not torch.equal(lin.weight, before_w)
    with torch.no_grad():
        _close(lin(x), _ref_out(method, cfg, params, x, weight, bias))


@pytest.mark.parametrize("case", [c for c in CASES if c.own_files], ids=[c.id for c in CASES if c.own_files])
def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    """Check 4."""
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    g = torch.Generator().manual_seed(3)
    modules = {
        path: method.init_params(cfg, torch.randn(shape, generator=g), "random", g)
        for path, shape in MODULE_SHAPES.items()
    }
    adapter = Adapter(method, cfg, modules, dict(MODULE_SHAPES))
    adapter.save(tmp_path)
    loaded = Adapter.load(tmp_path, MODULE_SHAPES)
    assert loaded.config == cfg and loaded.family == case.family
    assert loaded.modules.keys() == modules.keys()
    for path, tensors in modules.items():
        assert loaded.modules[path].keys() == tensors.keys()
        for name, t in tensors.items():
            assert loaded.modules[path][name].dtype == t.dtype
            assert torch.equal(loaded.modules[path][name], t), (path, name)
    assert loaded.trainable_count() == sum(method.trainable_count(cfg, *s) for s in MODULE_SHAPES.values())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_every_trainable_tensor_gets_a_gradient(case, shape_name):
    """Check 5: autograd reaches every trainable tensor and never the frozen base weight."""
    method, cfg, weight, bias, params = _setup(case, SHAPES[shape_name], 4)
    specs = method.param_specs(cfg, *SHAPES[shape_name])
    for name, spec in specs.items():
        if spec.trainable:
            params[name].requires_grad_(True)
    x = torch.randn(3, 4, SHAPES[shape_name][1])
    with torch.inference_mode():  # served first: what it caches must still serve a training backward
        adapted_forward(method, cfg, {k: v.detach() for k, v in params.items()}, x, weight, bias)
    y = adapted_forward(method, cfg, params, x, weight, bias)
    (y * torch.randn_like(y)).sum().backward()
    assert weight.grad is None
    for name, spec in specs.items():
        if spec.trainable:
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
        else:
            assert params[name].grad is None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_param_specs_match_init_and_count(case):
    for shape in SHAPES.values():
        method = get_method(case.family)
        cfg = method.parse_config(case.raw_config())
        specs = method.param_specs(cfg, *shape)
        mode = "train" if case.trains else "random"
        params = method.init_params(cfg, torch.randn(shape), mode, torch.Generator().manual_seed(0))
        assert params.keys() == specs.keys()
        for name, spec in specs.items():
            assert tuple(params[name].shape) == spec.shape, name
        assert method.trainable_count(cfg, *shape) == sum(
            params[n].numel() for n, s in specs.items() if s.trainable
        )


def test_every_registered_family_has_contract_cases():
    """Families are discovered from their files (server/methods/__init__.py): a new family file is
    served at once, so it must also be in the contract table above."""
    from server.methods import available_methods

    missing = sorted(set(available_methods()) - {c.family for c in CASES})
    assert not missing, f"families without a case in tests/methods/cases.py: {missing}"
