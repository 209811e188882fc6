"""The engine on CUDA: the mixed-adapter batch equals each request alone on a merged model.

Marked ``gpu`` (skipped without CUDA; ``bench/gpu.sh`` runs it). On CUDA the families' torch code
serves (the fused kernels are CPU-only), in float32, so the comparison is the CPU one's.
"""

from __future__ import annotations

import random

import pytest
import torch

from .helpers import assert_greedy_matches, make_engine, merged_copy, random_adapter
from .test_engine_exact import ENGINE_CASES, _run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("merged_budget", [0, 1 << 30], ids=["on-the-fly", "with-merged-cache"])
def test_mixed_batch_on_cuda_equals_each_request_alone(tiny_llama, merged_budget):
    model, tok = tiny_llama
    engine, reference = make_engine(
        model.to("cuda"), tok, merged_cache_bytes=merged_budget, merge_after_steps=1
    )
    assert engine.base.device.type == "cuda" and engine.planner.kernels is None
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapters = {}
    for i, (family, cfg) in enumerate(ENGINE_CASES):
        adapters[f"a{i}"] = random_adapter(family, cfg, shapes, weights, seed=10 + i)
        engine.add_adapter(f"a{i}", adapters[f"a{i}"])
    rng = random.Random(0)
    ids = [None, *adapters]
    plan = [(rng.randrange(4), [rng.randrange(1, 128) for _ in range(rng.randrange(2, 9))], a) for a in ids]
    outs = _run(engine, plan, max_new=6)
    for i, (_, prompt, adapter_id) in enumerate(plan):
        model_i = merged_copy(reference, adapters.get(adapter_id))
        assert_greedy_matches(outs[i], model_i, prompt, 6, f"request {i} adapter {adapter_id}")
    torch.cuda.synchronize()
