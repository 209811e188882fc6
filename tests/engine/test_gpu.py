"""The engine on CUDA: the mixed-adapter batch equals each request alone on a merged model.

Marked ``gpu`` (skipped without CUDA; ``bench/gpu.sh`` runs it). On CUDA the families' torch code
serves (the fused kernels are CPU-only), in float32, so the comparison is the CPU one's.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import make_engine
from .test_engine_exact import check_mixed_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("merged_budget", [0, 1 << 30], ids=["on-the-fly", "with-merged-cache"])
def test_mixed_batch_on_cuda_equals_each_request_alone(tiny_llama, merged_budget):
    model, tok = tiny_llama
    engine, reference = make_engine(
        model.to("cuda"), tok, merged_cache_bytes=merged_budget, merge_after_steps=1
    )
    assert engine.base.device.type == "cuda" and engine.planner.kernels is None
    check_mixed_batch(engine, reference, base_requests=1)
    torch.cuda.synchronize()
