"""C3A and FourierFT train through the one loop (their ``init_params("train")`` and on-the-fly
hooks), and the adapter saved is a PEFT folder PEFT itself loads and runs with Facet's logits
(FourierFT's positions come back from ``random_loc_seed`` on both sides)."""

from __future__ import annotations

import pytest

from server.jobs.train import Hyperparameters, train_adapter
from server.methods import Adapter, get_method

from .test_peft_export import assert_peft_runs_it
from .test_train import RECORDS, tiny_base

# Configs that fit the tiny Llama (sides 16, 32, 64) and the largest held-out/initial loss ratio
# after 40 steps at the family's default learning rate (measured: c3a .08, fourierft .22).
CONFIGS = {
    "c3a": ({"block_size": 8}, 0.2),
    "fourierft": ({"n_frequency": 64, "random_loc_seed": 5}, 0.5),
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_trains_and_saves_a_peft_folder_peft_runs(family, tmp_path):

    config, max_ratio = CONFIGS[family]
    lr = get_method(family).default_learning_rate
    hp = Hyperparameters(max_steps=40, learning_rate=lr, batch_size=4, seed=0)
    base = tiny_base()
    adapter, history = train_adapter(base, family, config, None, RECORDS, RECORDS, hp)
    first, last = history.val[0]["loss"], history.val[-1]["loss"]
    assert last < max_ratio * first, (family, first, last)
    adapter.save(tmp_path)
    assert Adapter.load(tmp_path, base.module_shapes).family == family
    assert assert_peft_runs_it(adapter, tmp_path).peft_type.value == family.upper()
