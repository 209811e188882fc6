"""LoRA: PEFT folders load unchanged and compute what PEFT computes; unsupported PEFT keys are refused."""

from __future__ import annotations

import copy
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
from server.methods.lora import GATHER_MAX_RANK, _gathered, _segmented
from tests.methods.cases import merge_into

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REGEX = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)"


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _peft_folder(tmp_path, seed=0, **lora_kwargs):
    """Base model, its PEFT-wrapped copy with random non-zero A and B, and the saved folder."""
    base = _tiny_llama(seed)
    lcfg = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), lcfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # PEFT's init_lora_weights=False already draws B; make it clearly non-zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path))
    return base, pm, tmp_path


def _close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= rel * scale


TARGET_VARIANTS = [
    pytest.param(dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]), id="list-alpha"),
    pytest.param(dict(r=4, lora_alpha=8, use_rslora=True, target_modules=REGEX), id="regex-rslora"),
    pytest.param(dict(r=2, lora_alpha=3, target_modules=REGEX), id="regex-alpha"),
    pytest.param(
        dict(
            r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj"], task_type="CAUSAL_LM"
        ),
        id="list-rslora-causal",
    ),
]


@pytest.mark.parametrize("kwargs", TARGET_VARIANTS)
def test_peft_folder_loads_unchanged_and_matches_peft(tmp_path, kwargs):
    base, pm, folder = _peft_folder(tmp_path, **kwargs)
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["lora_alpha"] == kwargs["lora_alpha"]

    shapes = _linear_shapes(base)
    adapter = Adapter.load(folder, shapes)
    method, cfg = adapter.method, adapter.config
    assert adapter.family == "lora"
    expected_s = kwargs["lora_alpha"] / (math.sqrt(kwargs["r"]) if kwargs.get("use_rslora") else kwargs["r"])
    assert cfg.scaling == pytest.approx(expected_s)

    peft_modules = dict(pm.base_model.model.named_modules())
    adapted = {n for n, m in peft_modules.items() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(adapter.modules) == adapted and adapted

    g = torch.Generator().manual_seed(7)
    for path, params in adapter.modules.items():
        out_f, in_f = shapes[path]
        lin = dict(base.named_modules())[path]
        x = torch.randn(3, 5, in_f, generator=g)
        with torch.no_grad():
            want = peft_modules[path](x)
            assert not torch.allclose(want, lin(x), atol=1e-3)  # the adapter really changes the module
            got = adapted_forward(method, cfg, params, x, lin.weight, lin.bias)
            _close(got, want)
            w_ref, b_ref = method.reference_weight(cfg, params, lin.weight, lin.bias)
            _close(x @ w_ref.T + (0 if b_ref is None else b_ref), want)

    # The whole PEFT model equals the base model with our merged weights written in.
    merged = copy.deepcopy(base)
    named = dict(merged.named_modules())
    for path, params in adapter.modules.items():
        merge_into(named[path], method, cfg, params)
    ids = torch.randint(0, 64, (2, 11), generator=g)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        _close(merged(input_ids=ids).logits, want)
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-3)


def test_peft_config_keys_are_all_known(plain_raw):
    """Every key PEFT writes for a plain LoRA is a field of our config (extra keys are forbidden)."""
    cfg = get_method("lora").parse_config(plain_raw)
    assert set(plain_raw) <= set(type(cfg).model_fields)


@pytest.fixture(scope="module")
def plain_raw(tmp_path_factory) -> dict:
    """adapter_config.json exactly as PEFT writes it for a plain LoRA."""
    _, _, folder = _peft_folder(tmp_path_factory.mktemp("plain"), r=2, target_modules=["q_proj"])
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("rank_pattern", ["q_proj"]),  # honoured when a {pattern: rank} mapping
        ("alpha_pattern", "q_proj"),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("bias", "lora_only"),
        ("fan_in_fan_out", True),
        ("layers_to_transform", [-1]),
        ("layers_pattern", "layers"),  # without layers_to_transform: PEFT refuses it too
        ("exclude_modules", ["v_proj"]),
        ("lora_bias", True),
        ("use_qalora", True),
        ("layer_replication", [[0, 1]]),
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["mlp.experts.weight"]),
        ("alora_invocation_tokens", [5]),
        ("megatron_config", {"a": 1}),
        ("megatron_core", "evil.module"),
        ("loftq_config", {"loftq_bits": 4}),
        ("corda_config", {"corda_method": "ipm"}),
        ("kasa_config", {"beta": 0.1}),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "loftq"),
        ("auto_mapping", {"base_model_class": "X", "parent_library": "y", "code": "z"}),
        ("r", 0),
        ("lora_dropout", 1.5),
        ("some_future_kwargs", {"trust_remote_code": True}),
    ],
)
def test_unsupported_peft_fields_are_rejected_by_name(plain_raw, field, value):
    raw = {**plain_raw, field: value}
    with pytest.raises(ConfigError) as e:
        get_method("lora").parse_config(raw)
    assert e.value.where == field, str(e.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_dropout", 0.1),
        ("init_lora_weights", "gaussian"),
        ("init_lora_weights", True),
        ("task_type", "CAUSAL_LM"),
        ("revision", "main"),
        ("peft_version", "0.17.0"),
        ("auto_mapping", None),
        ("rank_pattern", None),
        ("target_parameters", []),
        ("inference_mode", False),
        ("layers_to_transform", [0]),  # honoured: test_layer_selection_is_peft_s
        ("layers_to_transform", 1),
        ("rank_pattern", {"q_proj": 4}),  # honoured: test_rank_and_alpha_patterns_are_peft_s
        ("alpha_pattern", {"down_proj": 3.5}),
    ],
)
def test_harmless_peft_fields_are_accepted(plain_raw, field, value):
    raw = {**plain_raw, field: value}
    cfg = get_method("lora").parse_config(raw)
    assert getattr(cfg, field) == value


def test_peft_written_dora_folder_loads_as_dora_and_lora_refuses_use_dora(tmp_path):
    base = _tiny_llama()
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    pm.save_pretrained(str(tmp_path))
    assert Adapter.load(tmp_path, _linear_shapes(base)).family == "dora"  # see tests/api/test_peft_types.py
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(ConfigError, match="use_dora"):  # the LoRA family itself still refuses it
        get_method("lora").parse_config(raw)


@pytest.mark.parametrize(
    ("n_adapters", "r", "path"), [(2, 4, "gathered"), (9, 4, "gathered"), (4, 12, "segmented")]
)
def test_mixed_batch_each_path_matches_reference(n_adapters, r, path):
    method = get_method("lora")
    assert path == ("gathered" if r <= GATHER_MAX_RANK else "segmented")
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    adapters = []
    for i in range(n_adapters):
        raw = {
            "peft_type": "LORA",
            "target_modules": ["q"],
            "r": r,
            "lora_alpha": 2.0 + i,
            "use_rslora": i % 2 == 1,
        }
        cfg = method.parse_config(raw)
        adapters.append((cfg, method.init_params(cfg, weight, "random", g)))
    slots = torch.randint(0, n_adapters, (30,), generator=g)
    rows = torch.randperm(40, generator=g)[:30]
    x = torch.randn(40, 24, generator=g)
    table = stack_prepared([method.prepare(c, p, weight) for c, p in adapters])
    y = batched_linear(x, weight, bias, [Group(method, ("lora", r), table, rows, slots)])
    plain = x @ weight.T + bias
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(y[untouched], plain[untouched])
    for row, slot in zip(rows.tolist(), slots.tolist(), strict=True):
        cfg, params = adapters[slot]
        w2, b2 = method.reference_weight(cfg, params, weight, bias)
        _close(y[row], x[row] @ w2.T + b2)


@pytest.mark.parametrize("skew", [False, True])
def test_fast_paths_agree(skew):
    """The two mixed-batch forms (segmented, gathered) compute the same rows."""
    g = torch.Generator().manual_seed(1)
    n_slots, r, rows = 7, 3, 29
    a, bt = torch.randn(n_slots, r, 10, generator=g), torch.randn(n_slots, r, 6, generator=g)
    x = torch.randn(rows, 10, generator=g)
    slots = torch.randint(0, n_slots, (rows,), generator=g)
    if skew:  # one big group, most slots unused
        slots = torch.where(torch.rand(rows, generator=g) < 0.8, 5, 1)
    want = torch.stack([x[i] @ a[s].T @ bt[s] for i, s in enumerate(slots.tolist())])
    for fn in (_gathered, _segmented):
        _close(fn(x, a, bt, slots), want)


def test_our_saved_folder_loads_in_peft(tmp_path):
    """The reverse direction: a folder we write is read by PEFT and computes the same logits."""
    base = _tiny_llama(3)
    shapes = _linear_shapes(base)
    method = get_method("lora")
    cfg = method.parse_config(
        {
            "peft_type": "LORA",
            "target_modules": ["q_proj", "down_proj"],
            "r": 4,
            "lora_alpha": 6,
            "use_rslora": True,
        }
    )
    g = torch.Generator().manual_seed(0)
    named = dict(base.named_modules())
    modules = {
        p: method.init_params(cfg, named[p].weight, "random", g)
        for p in shapes
        if p.endswith(("q_proj", "down_proj"))
    }
    Adapter(method, cfg, modules, shapes).save(tmp_path)
    with pytest.warns(UserWarning, match="format_version"):  # our one extra key; PEFT ignores it
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    merged = copy.deepcopy(base)
    named = dict(merged.named_modules())
    for path, params in modules.items():
        merge_into(named[path], method, cfg, params)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    with torch.no_grad():
        _close(merged(input_ids=ids).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("extra", "adapted"),
    [
        ({"layers_to_transform": [1]}, {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}),
        ({"layers_to_transform": 0}, {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}),
        ({"layers_to_transform": [0], "layers_pattern": "blocks"}, {"model.blocks.0.q_proj"}),
        (
            {"layers_to_transform": [1], "target_modules": ["q_proj", "model.layers.0.mlp.down_proj"]},
            {"model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"},
        ),  # a full name is always adapted
        (
            {"layers_to_transform": []},
            {
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.mlp.down_proj",
            },
        ),
    ],
)
def test_layer_selection_is_peft_s(extra, adapted):
    """PEFT's check_target_module_exists: the first numbered path segment (or the one after
    layers_pattern) is the layer index; a name listed in full ignores the selection."""
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
    modules += ["model.blocks.0.q_proj", "model.blocks.1.q_proj"]
    raw = {"peft_type": "LORA", "target_modules": ["q_proj", "down_proj"], **extra}
    ours = {m for m in modules if get_method("lora").parse_config(raw).targets(m)}
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg = peft.LoraConfig(**{k: v for k, v in raw.items() if k != "peft_type"})
    assert ours == {m for m in modules if check_target_module_exists(peft_cfg, m)}
    assert ours - {"model.blocks.0.q_proj", "model.blocks.1.q_proj"} == adapted - {"model.blocks.0.q_proj"}


def test_rank_and_alpha_patterns_are_peft_s():
    """PEFT's get_pattern_key: the first key matching the end of the path (after a dot) wins."""
    from peft.utils.other import get_pattern_key

    rank = {"q_proj": 2, "layers.1.mlp.down_proj": 6, "mlp.*_proj": 3}
    alpha = {"k_proj": 3, "up_proj": 20.5}
    raw = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8}
    cfg = get_method("lora").parse_config({**raw, "rank_pattern": rank, "alpha_pattern": alpha})
    for i in (0, 1):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj"):
            path = f"model.layers.{i}.{m}"
            mod = cfg.for_module(path)
            assert mod.r == rank.get(get_pattern_key(rank.keys(), path), 4), path
            assert mod.lora_alpha == alpha.get(get_pattern_key(alpha.keys(), path), 8), path
            assert mod is cfg or (not mod.rank_pattern and not mod.alpha_pattern)
    assert cfg.for_module("model.layers.1.mlp.down_proj").r == 6
    plain = get_method("lora").parse_config(raw)
    assert plain.for_module("model.layers.0.self_attn.q_proj") is plain
