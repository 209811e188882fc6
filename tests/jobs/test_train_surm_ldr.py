"""Training SURM's low-displacement-rank variant (``variant="ldr"``): the one training loop on the
tiny Llama (hidden 32, k/v 16, MLP 64), and ``/fine-tunes`` over HTTP, 422s naming ``ldr_rank``.

The loss check mirrors tests/jobs/test_train.py's per-family one (measured held-out/initial loss
ratio after 40 steps: ldr r=2 .07, circulant .09).
"""

from __future__ import annotations

import pytest
import torch

from adapters_store import AdapterStore
from server.jobs import train as train_mod
from server.jobs.train import train_adapter
from server.methods import Adapter, ConfigError, adapted_forward
from tests.api.conftest import serve

from .test_api import BODY, app, wait_done  # noqa: F401  (app: the tiny-model app fixture)
from .test_train import RECORDS, hp, tiny_base

CONFIG, LR, MAX_RATIO = {"variant": "ldr", "ldr_rank": 2, "alpha": 1.0}, 3e-2, 0.15


def test_ldr_loss_drops_and_only_adapter_tensors_change():
    base = tiny_base()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    adapter, history = train_adapter(base, "surm", CONFIG, None, RECORDS, RECORDS, hp(LR))
    first, last = history.val[0]["loss"], history.val[-1]["loss"]
    assert last < MAX_RATIO * first, (first, last)
    after = base.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert set(adapter.modules) == set(base.modules)
    for path, params in adapter.modules.items():
        n = max(base.module_shapes[path])
        assert params.keys() == {"surm_g", "surm_h"}
        assert params["surm_g"].shape == params["surm_h"].shape == (2, n)
        assert torch.count_nonzero(params["surm_g"]) > 0  # the circulant part, zero at init, moved
        assert all(torch.isfinite(t).all() and not t.requires_grad for t in params.values())
    assert (
        history.trainable_params
        == adapter.trainable_count()
        == sum(2 * 2 * max(s) for s in base.module_shapes.values())
    )


def test_ldr_trains_after_being_served_in_inference_mode():
    """The twist η is built per call, never cached: a tensor made under inference mode could not
    be saved for a later backward."""
    base = tiny_base()
    method, cfg, targets = train_mod.build_config(base, "surm", CONFIG, None)
    params = train_mod.init_trainable(base, method, cfg, targets, torch.Generator().manual_seed(1))

    def serve_once(*_):
        with torch.inference_mode():
            for path, p in params.items():
                lin = base.modules[path].base
                adapted_forward(method, cfg, p, torch.randn(3, lin.in_features), lin.weight, lin.bias)

    serve_once()
    _, history = train_adapter(
        base, "surm", CONFIG, None, RECORDS, None, hp(LR, max_steps=3), on_step=serve_once
    )
    assert len(history.steps) == 3


def test_ldr_saved_folder_loads_and_is_accepted_by_the_store(tmp_path):
    base = tiny_base()
    adapter, _ = train_adapter(base, "surm", CONFIG, None, RECORDS, None, hp(LR, max_steps=2))
    adapter.save(tmp_path / "ldr")
    loaded = Adapter.load(tmp_path / "ldr", base.module_shapes)
    assert loaded.config == adapter.config and loaded.config.ldr_rank == 2
    for path, params in adapter.modules.items():
        assert all(torch.equal(loaded.modules[path][n], t) for n, t in params.items())
    store = AdapterStore(tmp_path / "store", base.module_shapes, base.name)
    config_bytes = (tmp_path / "ldr" / "adapter_config.json").read_bytes()
    rec = store.put("ldr-job", config_bytes, tmp_path / "ldr" / "adapter_model.safetensors")
    assert rec.family == "surm" and rec.trainable_params == adapter.trainable_count()
    store.close()


@pytest.mark.parametrize("config", [{"variant": "ldr"}, {"variant": "ldr", "ldr_rank": 65}])
def test_bad_ldr_configs_fail_before_training(config):
    with pytest.raises(ConfigError, match="ldr_rank"):
        train_adapter(tiny_base(), "surm", config, None, RECORDS, None, hp(LR))


@pytest.mark.asyncio
async def test_fine_tune_endpoint_trains_and_serves_ldr(app):  # noqa: F811
    body = {**BODY, "adapter_id": "ldr", "method": "surm", "method_config": CONFIG}
    async with serve(app) as client:
        response = await client.post("/fine-tunes", json=body)
        assert response.status_code == 202, response.text
        done = await wait_done(client, response.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        assert (await client.get("/adapters/ldr")).json()["family"] == "surm"
        gen = await client.post("/generate", json={"prompt": "t1 t10", "adapter": "ldr", "max_new_tokens": 2})
        assert gen.status_code == 200, gen.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "config",
    [
        {"variant": "ldr"},
        {"variant": "ldr", "ldr_rank": 0},
        {"variant": "circulant", "ldr_rank": 2},
        {"variant": "ldr", "ldr_rank": 40},  # above N = 32 of the tiny model's attention projections
    ],
)
async def test_fine_tune_endpoint_refuses_bad_ldr_rank_by_name(app, config):  # noqa: F811
    async with serve(app) as client:
        response = await client.post("/fine-tunes", json={**BODY, "method": "surm", "method_config": config})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["where"] == "body.method_config.ldr_rank", response.text
        assert (await client.get("/fine-tunes")).json()["total"] == 0


def test_ldr_has_its_own_default_learning_rate():
    """SURM's 1e-2 suits one product per ΔW entry; ldr sums r·N of them (docs/adapter-format.md)."""
    from server.jobs.train import Hyperparameters
    from server.methods import get_method

    surm = get_method("surm")
    ldr = surm.parse_config({"peft_type": "SURM", "target_modules": ["q_proj"], **CONFIG})
    circulant = surm.parse_config({"peft_type": "SURM", "target_modules": ["q_proj"]})
    assert Hyperparameters().lr_for(surm, ldr) == 1e-3
    assert Hyperparameters().lr_for(surm, circulant) == surm.default_learning_rate == 1e-2
    assert Hyperparameters(learning_rate=0.5).lr_for(surm, ldr) == 0.5  # a given one wins
