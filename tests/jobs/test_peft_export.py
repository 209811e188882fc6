"""A fine-tuned adapter of a PEFT type (IA3, HiRA, DoRA, HRA) is saved as a PEFT folder of that type
which PEFT itself loads and runs: its logits equal Facet's for the same adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from server.jobs.data import Record
from server.jobs.train import Hyperparameters, train_adapter
from server.methods import Adapter
from tests.conftest import make_tiny_llama

from .test_train import tiny_base

RECORDS = [Record(i + 1, prompt=f"t{1 + i} t{10 + i}", completion=f"t{40 + i} t{50 + i}") for i in range(4)]
CONFIGS = {
    "ia3": {"feedforward_modules": ["up_proj", "down_proj"]},
    "hira": {"r": 2},
    "dora": {"r": 4, "lora_alpha": 8},
    "hra": {"r": 4},
    "hra-gs": {"r": 3, "apply_GS": True},
}
# Worst-case float32 rounding of a logit: eps per term of the reductions on its path (two layers
# of projections of length 32-64 and attention, about 2 x 250 terms, and the head's 32) at the
# logits' scale (below 10: the head is scaled by 10).
TOL = 550 * torch.finfo(torch.float32).eps * 10


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_trained_adapter_saves_as_a_peft_folder_peft_runs(kind, tmp_path):

    base = tiny_base()
    family = kind.split("-")[0]
    hp = Hyperparameters(max_steps=8, learning_rate=3e-2, batch_size=4, seed=0)
    adapter, _ = train_adapter(base, family, CONFIGS[kind], None, RECORDS, RECORDS, hp)
    adapter.save(tmp_path)
    assert Adapter.load(tmp_path, base.module_shapes).family == family

    peft_config = assert_peft_runs_it(adapter, tmp_path)
    assert type(peft_config).__name__.upper().startswith(family.upper().replace("DORA", "LORA"))


def assert_peft_runs_it(adapter: Adapter, folder) -> object:
    """PEFT loads the saved ``folder`` onto the plain tiny Llama and gives the logits of that
    model with ``adapter`` merged by Facet (within TOL), which training moved visibly; returns
    the config PEFT read."""
    import peft

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    plain = make_tiny_llama(0)  # what tiny_base wraps: same weights, head scaled the same
    with torch.no_grad():
        plain.lm_head.weight.mul_(10.0)
    merged = copy.deepcopy(plain)
    with torch.no_grad():
        before = plain(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our one extra key, format_version
        pm = peft.PeftModel.from_pretrained(plain, str(folder)).eval()
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
    return pm.peft_config["default"]
