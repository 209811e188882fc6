"""C3A and FourierFT train through the one loop (their ``init_params("train")`` and on-the-fly
hooks), and the adapter saved is a PEFT folder PEFT itself loads and runs with Facet's logits
(FourierFT's positions come back from ``random_loc_seed`` on both sides)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from server.jobs.train import Hyperparameters, train_adapter
from server.methods import Adapter, get_method
from tests.conftest import make_tiny_llama

from .test_train import RECORDS, tiny_base

# Configs that fit the tiny Llama (sides 16, 32, 64) and the largest held-out/initial loss ratio
# after 40 steps at the family's default learning rate (measured: c3a .08, fourierft .22).
CONFIGS = {
    "c3a": ({"block_size": 8}, 0.2),
    "fourierft": ({"n_frequency": 64, "random_loc_seed": 5}, 0.5),
}
# As tests/jobs/test_peft_export.py: eps per term of a logit's reductions at the logits' scale.
TOL = 550 * torch.finfo(torch.float32).eps * 10


@pytest.mark.parametrize("family", list(CONFIGS))
def test_trains_and_saves_a_peft_folder_peft_runs(family, tmp_path):
    import peft

    config, max_ratio = CONFIGS[family]
    lr = get_method(family).default_learning_rate
    hp = Hyperparameters(max_steps=40, learning_rate=lr, batch_size=4, seed=0)
    base = tiny_base()
    adapter, history = train_adapter(base, family, config, None, RECORDS, RECORDS, hp)
    first, last = history.val[0]["loss"], history.val[-1]["loss"]
    assert last < max_ratio * first, (family, first, last)
    adapter.save(tmp_path)
    assert Adapter.load(tmp_path, base.module_shapes).family == family

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    plain = make_tiny_llama(0)  # what tiny_base wraps: same weights, head scaled the same
    with torch.no_grad():
        plain.lm_head.weight.mul_(10.0)
    merged = copy.deepcopy(plain)
    with torch.no_grad():
        before = plain(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our one extra key, format_version
        pm = peft.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    assert pm.peft_config["default"].peft_type.value == family.upper()
    named = dict(merged.named_modules())
    with torch.no_grad():
        for path, params in adapter.modules.items():
            lin = named[path]
            w, _ = adapter.method.merged_weight(adapter.config_for(path), params, lin.weight, lin.bias)
            lin.weight.copy_(w)
        ours = merged(input_ids=ids).logits
        theirs = pm(input_ids=ids).logits
    assert (ours - before).abs().max() > 100 * TOL  # training moved the model
    assert (theirs - ours).abs().max() <= TOL
