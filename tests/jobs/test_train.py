"""The one training loop, on a tiny random Llama, for every family."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_store import AdapterStore
from server.engine.loader import wrap_model
from server.jobs import train as train_mod
from server.jobs.data import Record
from server.jobs.train import Hyperparameters, TrainingError, train_adapter
from server.methods import Adapter, ConfigError, adapted_forward, dct
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.engine.helpers import TARGETS

# Small configs that fit the tiny model (hidden 32, k/v 16, MLP 64), a learning rate each, and the
# largest held-out/initial loss ratio after 40 steps (ETHER's norm-preserving transforms learn the
# least here; measured ratios: lora .07, hut .18, ether .64, dct .08, surm .09).
FAMILIES = {
    "lora": ({"r": 4, "lora_alpha": 8}, 1e-2, 0.15),
    "hut": ({"r": 1, "use_scale_shift": True}, 1e-1, 0.3),
    "ether": ({"variant": "etherplus", "n_blocks": 1}, 3e-2, 0.8),
    "dct": ({"n_frequency": 64}, 3e-2, 0.15),
    "surm": ({"variant": "circulant"}, 3e-2, 0.15),
    # PEFT types through a family's math (IA3 with input-side MLP scales, HiRA, DoRA)
    # (measured ratios: ia3 .32, hira .29, dora .07, hra .50; HRA only rotates the inputs)
    "ia3": ({"feedforward_modules": ["up_proj", "down_proj"]}, 1e-1, 0.5),
    "hira": ({"r": 2}, 3e-2, 0.45),
    "dora": ({"r": 4, "lora_alpha": 8}, 1e-2, 0.15),
    "hra": ({"r": 4}, 3e-2, 0.75),
}

# A memorisation task: four prompts, each with its own three-token answer.
RECORDS = [
    Record(i + 1, prompt=f"t{1 + i} t{10 + i} t{20 + i}", completion=f"t{40 + i} t{50 + i} t{60 + i}")
    for i in range(4)
]


def tiny_base(seed: int = 0):
    """The tiny random Llama with its output head scaled up: at init scale (std 0.02, hidden 32)
    its logits cannot move more than about ±0.6, so no adapter could fit anything."""
    model = make_tiny_llama(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return wrap_model("tiny", model, make_tokenizer(), TARGETS)


def hp(lr: float, **kw) -> Hyperparameters:
    return Hyperparameters(**{"max_steps": 40, "learning_rate": lr, "batch_size": 4, "seed": 0, **kw})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_drops_and_only_adapter_tensors_change(family):
    base = tiny_base()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    config, lr, max_ratio = FAMILIES[family]
    adapter, history = train_adapter(base, family, config, None, RECORDS, RECORDS, hp(lr))

    first, last = history.val[0]["loss"], history.val[-1]["loss"]
    assert history.val[0]["step"] == 0 and history.val[-1]["step"] == 40
    assert last < max_ratio * first, (family, first, last)
    assert len(history.steps) == 40 and history.steps[-1]["loss"] < history.steps[0]["loss"]
    # The base model is untouched: bit-identical, no gradients, nothing requires grad.
    after = base.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    for name, p in base.model.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    # Every wrapped linear got the family's full set of tensors, all finite.
    assert set(adapter.modules) == set(base.modules)
    assert history.trainable_params == adapter.trainable_count() > 0
    for params in adapter.modules.values():
        for t in params.values():
            assert not t.requires_grad
            if t.is_floating_point():
                assert torch.isfinite(t).all()


def test_dct_positions_are_fixed_and_coefficients_move():
    base = tiny_base()
    config, lr, _ = FAMILIES["dct"]
    method, cfg, targets = train_mod.build_config(base, "dct", config, None)
    init = train_mod.init_trainable(base, method, cfg, targets, torch.Generator().manual_seed(0))
    adapter, _ = train_adapter(base, "dct", config, None, RECORDS, None, hp(lr, max_steps=3))
    for path, params in adapter.modules.items():
        assert torch.equal(params["dct_rows"], init[path]["dct_rows"].cpu())
        assert not init[path]["dct_rows"].requires_grad
        assert not torch.equal(params["dct_coef"], init[path]["dct_coef"].detach().cpu())


def test_same_seed_same_adapter_other_seed_differs():
    config, lr, _ = FAMILIES["lora"]
    a1, h1 = train_adapter(
        tiny_base(), "lora", config, None, RECORDS, None, hp(lr, max_steps=5, batch_size=2)
    )
    a2, h2 = train_adapter(
        tiny_base(), "lora", config, None, RECORDS, None, hp(lr, max_steps=5, batch_size=2)
    )
    a3, _ = train_adapter(
        tiny_base(), "lora", config, None, RECORDS, None, hp(lr, max_steps=5, batch_size=2, seed=1)
    )
    assert [s["loss"] for s in h1.steps] == [s["loss"] for s in h2.steps]
    for path in a1.modules:
        for name in a1.modules[path]:
            assert torch.equal(a1.modules[path][name], a2.modules[path][name])
    assert any(not torch.equal(a1.modules[p]["lora_A"], a3.modules[p]["lora_A"]) for p in a1.modules)


def _first_step_grads(monkeypatch, **kw) -> dict[int, torch.Tensor]:
    """The gradients of the first optimizer step, as clipping sees them (before AdamW moves anything).

    Comparing parameters after AdamW would amplify rounding: its first update is about
    ``lr · g / |g|``, so a gradient entry near zero flips sign on a different summation order.
    """
    seen: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        if not seen:
            seen.append([p.grad.detach().clone() for p in params])
        return clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    config, lr, _ = FAMILIES["lora"]
    train_adapter(tiny_base(), "lora", config, None, RECORDS, None, hp(lr, max_steps=1, **kw))
    monkeypatch.undo()
    return dict(enumerate(seen[0]))


def test_grad_accum_matches_one_big_batch(monkeypatch):
    """4 micro-batches of 1 accumulate the same gradient as one batch of 4 (the same examples:
    the epoch order comes from the seed). The two differ only in summation order, so the bound is
    float32's epsilon times the reduction length (tokens of the step x the widest layer, 64) times
    the gradient's scale; a wrong normalisation or a lost micro-batch is off by far more."""
    big = _first_step_grads(monkeypatch, batch_size=4)
    acc = _first_step_grads(monkeypatch, batch_size=1, grad_accum=4)
    n_tokens = sum(len(r.prompt.split()) + len(r.completion.split()) + 2 for r in RECORDS)
    bound = torch.finfo(torch.float32).eps * n_tokens * 64
    assert big.keys() == acc.keys()
    # LoRA starts from B = 0, so A's first gradient is exactly 0 on both sides; B's is not
    assert sum(bool(g.any()) for g in big.values()) == len(big) // 2
    for i, g in big.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(acc[i], g, rtol=0, atol=bound * scale)
        if scale > 0:  # the bound is tight enough to see a wrong normalisation
            assert not torch.allclose(acc[i] * 1.01, g, rtol=0, atol=bound * scale)


def test_epochs_count_steps_and_target_modules_restrict():
    base = tiny_base()
    adapter, history = train_adapter(
        base, "lora", {"r": 2}, ["q_proj", "v_proj"], RECORDS, None, Hyperparameters(epochs=3, batch_size=3)
    )
    assert history.total_steps == 6 and len(history.steps) == 6  # ceil(4 / 3) = 2 steps per epoch
    assert set(adapter.modules) == {p for p in base.modules if p.endswith(("q_proj", "v_proj"))}
    assert adapter.config.target_modules == ["q_proj", "v_proj"]


def test_saved_folder_loads_and_is_accepted_by_the_store(tmp_path):
    base = tiny_base()
    for family, (config, lr, _) in FAMILIES.items():
        adapter, _ = train_adapter(base, family, config, None, RECORDS, None, hp(lr, max_steps=2))
        folder = tmp_path / family
        adapter.save(folder)
        loaded = Adapter.load(folder, base.module_shapes)
        assert loaded.family == family and loaded.config == adapter.config
        for path, params in adapter.modules.items():
            for name, t in params.items():
                assert torch.equal(loaded.modules[path][name], t)
        store = AdapterStore(tmp_path / "store", base.module_shapes, base.name)
        config_bytes = (folder / "adapter_config.json").read_bytes()
        rec = store.put(f"{family}-job", config_bytes, folder / "adapter_model.safetensors")
        assert rec.family == family and rec.trainable_params == adapter.trainable_count()
        store.put(f"{family}-job@2", config_bytes, folder / "adapter_model.safetensors")  # checkpoint id
        store.close()


def test_callbacks_stop_and_checkpoint():
    config, lr, _ = FAMILIES["lora"]
    seen, checkpoints = [], []
    adapter, history = train_adapter(
        tiny_base(),
        "lora",
        config,
        None,
        RECORDS,
        None,
        hp(lr, max_steps=20, batch_size=2, checkpoint_every=2),
        on_step=seen.append,
        should_stop=lambda: len(seen) >= 5,
        on_checkpoint=lambda step, a: checkpoints.append((step, a)),
    )
    assert history.stopped and [s["step"] for s in seen] == [1, 2, 3, 4, 5]
    assert [c[0] for c in checkpoints] == [2, 4]
    assert isinstance(checkpoints[0][1], Adapter)
    assert seen[-1]["epoch"] == 2 and seen[0]["total_steps"] == 20


def test_non_finite_loss_is_a_clear_error(monkeypatch):
    def nan_loss(base, batch, pad_id):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(train_mod, "loss_sum", nan_loss)
    with pytest.raises(TrainingError, match="training loss is nan at step 1"):
        train_adapter(tiny_base(), "lora", {"r": 2}, None, RECORDS, None, hp(1e-2, max_steps=3))


@pytest.mark.parametrize(
    "family, config, targets, needle",
    [
        ("nope", {}, None, "unknown adapter family"),
        ("lora", {"r": 0}, None, "r"),
        ("lora", {"bogus": 1}, None, "bogus"),
        ("lora", {}, ["lm_head"], "matches no adaptable linear"),
        ("dct", {"n_frequency": 100000}, None, "n_frequency"),
        ("lora", {"peft_type": "HUT"}, None, "does not match"),
    ],
)
def test_bad_configs_fail_before_training(family, config, targets, needle):
    with pytest.raises(ConfigError, match=needle):
        train_adapter(tiny_base(), family, config, targets, RECORDS, None, hp(1e-2))


def test_command_line_writes_a_loadable_folder(tmp_path, capsys):
    model_dir = tmp_path / "tiny-model"
    make_tiny_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in RECORDS)
    )
    out = tmp_path / "adapter"
    rc = train_mod.main(
        ["--data", str(data), "--val", str(data), "--method", "lora", "--config", '{"r": 2}']
        + [
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--max-steps",
            "3",
            "--lr",
            "0.01",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_steps"] == 3 and len(summary["val"]) == 2
    adapter = Adapter.load(out, tiny_base().module_shapes)
    assert adapter.family == "lora" and adapter.config.r == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t1", "completion": "t2"}\n{"prompt": "t1"}\n')
    rc = train_mod.main(["--data", str(bad), "--method", "lora", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "line 2:" in capsys.readouterr().err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_works_after_the_family_was_served_in_inference_mode(family):
    """Serving runs under ``torch.inference_mode``: constants a family caches there (DCT's FFT
    plans) are inference tensors; training must still work, also when serving refills such a
    cache between two training steps."""
    base = tiny_base()
    config, lr, _ = FAMILIES[family]
    method, cfg, targets = train_mod.build_config(base, family, config, None)
    params = train_mod.init_trainable(base, method, cfg, targets, torch.Generator().manual_seed(1))

    def serve_once(*_):
        dct._plan.cache_clear()  # as if evicted: refilled in inference mode below
        with torch.inference_mode():
            for path, p in params.items():
                lin = base.modules[path].base
                adapted_forward(method, cfg, p, torch.randn(3, lin.in_features), lin.weight, lin.bias)

    serve_once()
    _, history = train_adapter(
        base, family, config, None, RECORDS, None, hp(lr, max_steps=3), on_step=serve_once
    )
    assert len(history.steps) == 3


def test_per_module_ranks_are_served_but_not_trained():
    """One config per training binding: a LoRA rank_pattern that changes a module is refused by name."""
    from server.jobs.train import build_config

    base = tiny_base()
    with pytest.raises(ConfigError) as e:
        build_config(base, "lora", {"r": 4, "rank_pattern": {"q_proj": 2}}, None)
    assert e.value.where == "method_config"
    build_config(base, "lora", {"r": 4, "rank_pattern": {"no_such_proj": 2}}, None)  # changes nothing: fine
