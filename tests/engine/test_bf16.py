"""Serving in bfloat16 (what ``--dtype auto`` picks on CUDA and on CPUs with bf16 matrix math).

On CPU, bf16 rows go through the fused kernels where a family has one (float32 arithmetic, one
rounding on write-back; ``tests/methods/test_kernels_bf16.py``) and the torch code otherwise.
Exactness stays a float32 matter (test_engine_exact.py); here bf16 is held to tolerances:

* Method level, every (family, config) case in one mixed batch: the batched bf16 output against a
  bf16 dense reference (the merged ``W'`` rounded to bf16, one GEMM). Both are compared with the
  float64 product of the same bf16 inputs: each is within a few bf16 roundings of values of the
  size of ``S = |x| · |W'|ᵀ`` (the tables and ``W'`` rounded once, an intermediate rounded once,
  the output rounded once) plus the float32 accumulation's ``K · eps32 · S`` over the reduction
  length ``K``. The adapters' own effect is checked to stand well above that bound, so the bound
  can tell a served adapter from a missing one.
* Engine level (tiny Llama in bf16, the 5 families and base rows in one continuous batch): every
  request completes; the greedy agreement with each request alone on its merged bf16 model is
  reported as a rate (near-ties flip in bf16 by design) and only required to be a clear majority.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from server.engine.requests import FinishEvent, SamplingParams, TokenEvent
from server.methods import Group, batched_linear, get_method, stack_prepared
from tests.api.conftest import FAMILY_CONFIGS
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.methods.cases import CASES, SHAPES

from .helpers import make_engine, merged_copy, random_adapter

EPS16 = torch.finfo(torch.bfloat16).eps
EPS32 = torch.finfo(torch.float32).eps
ROUNDINGS = 3  # tables / W', one intermediate, the output


def _prepare_bf16(method, cfg, params, w16, b16) -> dict[str, torch.Tensor]:
    """As the residency does: prepared in float32 from the bf16 weight, stored in bf16."""
    extra = {"bias": b16.float()} if getattr(method, "prepare_uses_bias", False) else {}
    out = method.prepare(cfg, params, w16.float(), **extra)
    return {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in out.items()}


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_bf16_mixed_batch_within_rounding_of_bf16_dense_reference(shape_name):
    out_f, in_f = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    w16 = torch.randn(out_f, in_f, generator=g).bfloat16()
    b16 = torch.randn(out_f, generator=g).bfloat16()
    adapters = []
    for i, case in enumerate(CASES * 2):  # two adapters per case: several slots per table
        method = get_method(case.family)
        cfg = method.parse_config(case.raw_config())
        params = method.init_params(cfg, w16.float(), "random", torch.Generator().manual_seed(100 + i))
        adapters.append((case.id, method, cfg, params))
    owners = [None] * 5 + [a for a in range(len(adapters)) for _ in range(3)]
    random.Random(0).shuffle(owners)
    x16 = torch.randn(len(owners), in_f, generator=g).bfloat16()
    by_sig: dict = {}
    for a, (_, method, cfg, _) in enumerate(adapters):
        by_sig.setdefault((method.name, method.signature(cfg, out_f, in_f)), []).append(a)
    groups = []
    for (_, sig), members in by_sig.items():
        method = adapters[members[0]][1]
        table = stack_prepared([_prepare_bf16(*adapters[a][1:], w16, b16) for a in members])
        rows = [r for r, o in enumerate(owners) if o in members]
        slots = [members.index(owners[r]) for r in rows]
        groups.append(Group(method, sig, table, torch.tensor(rows), torch.tensor(slots)))
    with torch.no_grad():
        y = batched_linear(x16, w16, b16, groups)
    assert y.dtype == torch.bfloat16

    bound = ROUNDINGS * EPS16 + in_f * EPS32
    effect: dict[str, float] = {}
    for r, o in enumerate(owners):
        xr = x16[r].double()
        if o is None:
            exact = xr @ w16.double().T + b16.double()
            scale = float((xr.abs() @ w16.double().abs().T).max() + b16.double().abs().max())
            assert float((y[r].double() - exact).abs().max()) <= bound * scale, f"row {r}: no adapter"
            continue
        case_id, method, cfg, params = adapters[o]
        p64 = {k: (v.double() if v.is_floating_point() else v) for k, v in params.items()}
        w64, b64 = method.reference_weight(cfg, p64, w16.double(), b16.double())
        exact = xr @ w64.T + (0 if b64 is None else b64)
        scale = float((xr.abs() @ w64.abs().T).max() + (0 if b64 is None else b64.abs().max()))
        w2, b2 = method.reference_weight(cfg, params, w16.float(), b16.float())
        dense16 = F.linear(x16[r : r + 1], w2.bfloat16(), None if b2 is None else b2.bfloat16())[0]
        for what, got in (("batched", y[r]), ("dense bf16 reference", dense16)):
            err = float((got.double() - exact).abs().max())
            assert err <= bound * scale, f"{case_id} row {r}: {what} off by {err:.3g} > {bound * scale:.3g}"
        err = float((y[r].double() - dense16.double()).abs().max())
        assert err <= 2 * bound * scale, f"{case_id} row {r}: batched vs dense bf16 {err:.3g}"
        base = xr @ w16.double().T + b16.double()
        effect[case_id] = max(effect.get(case_id, 0.0), float((exact - base).abs().max()) / scale)
    weak = {c: round(e / bound, 2) for c, e in effect.items() if e < 2 * bound}
    assert not weak, f"adapters whose effect the bound cannot see (effect / bound): {weak}"


def test_bf16_engine_serves_every_family_in_one_batch():
    model = make_tiny_llama(seed=1).to(torch.bfloat16)
    engine, reference = make_engine(model, make_tokenizer(), dtype="bfloat16", merged_cache_bytes=0)
    assert engine.base.dtype == torch.bfloat16
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight.float() for p, m in engine.base.modules.items()}
    adapters = {
        f"{family}": random_adapter(family, cfg, shapes, weights, seed=20 + i)
        for i, (family, cfg) in enumerate(FAMILY_CONFIGS.items())
    }
    for name, a in adapters.items():
        engine.add_adapter(name, a)
    rng = random.Random(0)
    plan = [([rng.randrange(1, 128) for _ in range(rng.randrange(3, 9))], a) for a in [None, *adapters] * 2]
    n = 8
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0), a) for p, a in plan]
    for _ in range(100):
        if not (engine.generator.num_running or engine.generator.num_waiting):
            break
        engine.generator.step()
    agree = total = 0
    for (prompt, name), req in zip(plan, reqs, strict=True):
        events = req.sink.drain()
        assert isinstance(events[-1], FinishEvent), name
        assert events[-1].finish_reason == "length", (name, events[-1])
        got = [e.token_id for e in events if isinstance(e, TokenEvent)]
        ref_model = merged_copy(reference, adapters.get(name))
        ids = torch.tensor([prompt])
        ref = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        ref = ref[0, len(prompt) :].tolist()
        same = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), n)
        agree, total = agree + same, total + n  # tokens before the first divergence
    rate = agree / total
    print(f"bf16 greedy agreement with each request alone (merged bf16 model): {rate:.2f}")
    assert rate >= 0.5, f"bf16 greedy agreement {rate:.2f}: below a clear majority"
