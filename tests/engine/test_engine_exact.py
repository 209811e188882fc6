"""Greedy outputs of a mixed-adapter continuous batch equal each request alone on a merged model."""

from __future__ import annotations

import random
import shutil

import pytest

from server.engine.requests import FinishEvent, SamplingParams, TokenEvent
from tests.methods.cases import CASES

from .helpers import assert_greedy_matches, make_engine, merged_copy, random_adapter

# Tiny Llama dims (hidden 32, kv 16, mlp 64) need block/factor sizes that divide them.
ENGINE_CASES = [
    (c.family, {**c.config, **({"n_blocks": 2} if "n_blocks" in c.config else {})}) for c in CASES
]
ENGINE_CASE_IDS = [c.id for c in CASES]
# The five families' configs that have a fused kernel for every hook (HUT rank > 1 is served merged).
KERNEL_CASE_IDS = {
    "lora-r4",
    "hut-r1",
    "ether-in-1",
    "etherplus-both-4",
    "dct-n20",
    "surm-circulant",
    "surm-toeplitz",
    "surm-kronecker-4",
}


def _run(engine, plan, max_new):
    """plan: list of (arrival_step, prompt, adapter_id). Steps the generator by hand."""
    reqs, step = {}, 0
    pending = sorted(enumerate(plan), key=lambda p: p[1][0])
    while pending or engine.generator.num_running or engine.generator.num_waiting:
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, adapter_id) = pending.pop(0)
            reqs[i] = engine.submit(prompt, SamplingParams(max_new_tokens=max_new, temperature=0), adapter_id)
        engine.generator.step()
        step += 1
        assert step < 500
    outs = {}
    for i, req in reqs.items():
        events = req.sink.drain()
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length"
        outs[i] = [e.token_id for e in events if isinstance(e, TokenEvent)]
    return outs


@pytest.mark.parametrize(
    "merged_budget,cpu_kernels",
    [(0, True), (0, False), (1 << 30, True)],
    ids=["on-the-fly", "on-the-fly-torch-code", "with-merged-cache"],
)
def test_mixed_batch_equals_each_request_alone_on_merged_model(tiny_llama, merged_budget, cpu_kernels):
    model, tok = tiny_llama
    engine, reference = make_engine(
        model, tok, merged_cache_bytes=merged_budget, merge_after_steps=1, cpu_kernels=cpu_kernels
    )
    # Where a C++ compiler exists the fused CPU kernels must be what serves (server/kernels).
    if not cpu_kernels:
        assert engine.planner.kernels is None
    elif shutil.which("c++") or shutil.which("g++"):
        assert engine.planner.kernels is not None
    check_mixed_batch(engine, reference, base_requests=2)


@pytest.mark.parametrize(
    "cache",
    [{"kv_cache": "paged", "kv_block_size": 2}, {"kv_cache": "padded"}],
    ids=["paged-blocks-of-2", "padded"],
)
def test_mixed_batch_on_small_blocks_and_on_the_padded_cache(tiny_llama, cache):
    """Sequences spanning many blocks (paged), and the left-padded cache kept for comparison."""
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok, **cache)
    assert type(engine.generator).__name__ == (
        "PagedGenerator" if cache["kv_cache"] == "paged" else "Generator"
    )
    check_mixed_batch(engine, reference, base_requests=2)


def check_mixed_batch(engine, reference, base_requests: int, only: set[str] | None = None) -> None:
    """One adapter of every engine case (or of the case ids in ``only``) plus ``base_requests``
    base-model requests, arriving over the first 4 steps with random prompts: each equals its own
    merged model alone (greedy)."""
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapters = {}
    for i, (family, cfg) in enumerate(ENGINE_CASES):
        if only is not None and ENGINE_CASE_IDS[i] not in only:
            continue
        adapters[f"a{i}"] = random_adapter(family, cfg, shapes, weights, seed=10 + i)
        engine.add_adapter(f"a{i}", adapters[f"a{i}"])
    rng = random.Random(0)
    ids = [None] * base_requests + list(adapters)
    plan = [(rng.randrange(4), [rng.randrange(1, 128) for _ in range(rng.randrange(2, 9))], a) for a in ids]
    _assert_each_alone(engine, reference, adapters, plan, max_new=6)


def _add_loras(engine, prefix: str, n: int, seed: int) -> dict:
    """Register ``n`` random LoRA r4 adapters ``{prefix}0..``; returns id -> adapter."""
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapters = {
        f"{prefix}{i}": random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=seed + i)
        for i in range(n)
    }
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    return adapters


def _assert_each_alone(engine, reference, adapters: dict, plan, max_new: int) -> None:
    """Run ``plan`` (see ``_run``) greedily: each request equals its own merged model alone."""
    outs = _run(engine, plan, max_new=max_new)
    for i, (_, prompt, adapter_id) in enumerate(plan):
        model_i = merged_copy(reference, adapters.get(adapter_id))
        assert_greedy_matches(outs[i], model_i, prompt, max_new, f"request {i} adapter {adapter_id}")


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler: no kernels")
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_steps_whose_hooks_all_have_kernels_take_the_lean_path_and_match(tiny_llama, monkeypatch, native):
    """Projections whose pools all have fused kernels for every hook (LoRA's delta; HUT's, ETHER's,
    DCT's and SURM's hooks in a mixed step) run the kernels around the base GEMM without
    batched_linear's dispatch: as one native call per projection (``Projection``, bound once by
    ServeBinding._native_plan), or with the native plans off, kernel by kernel from Python
    (adapted_linear._fused_plan). Each request still equals its own merged model alone."""
    from server.engine import adapted_linear

    built = []
    if native:
        plan_of = adapted_linear.ServeBinding._native_plan

        def recorded(self, path, base, groups):
            run = plan_of(self, path, base, groups)
            if run is not None:
                built.append({g.method.name for g in groups})
            return run

        monkeypatch.setattr(adapted_linear.ServeBinding, "_native_plan", recorded)
    else:
        lean = adapted_linear._fused_plan
        monkeypatch.setattr(
            adapted_linear.ServeBinding, "_native_plan", lambda self, path, base, groups: None
        )
        monkeypatch.setattr(
            adapted_linear,
            "_fused_plan",
            lambda base, groups: built.append({g.method.name for g in groups}) or lean(base, groups),
        )
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok, merged_cache_bytes=0, cpu_kernels=True)
    assert engine.planner.kernels is not None
    adapters = _add_loras(engine, "l", 3, seed=40)
    rng = random.Random(1)
    plan = [(0, [rng.randrange(1, 128) for _ in range(5 + i)], a) for i, a in enumerate([*adapters, None])]
    _assert_each_alone(engine, reference, adapters, plan, max_new=6)
    assert built and set().union(*built) == {"lora"}, "the LoRA-only steps took the lean path"
    built.clear()
    assert KERNEL_CASE_IDS <= set(ENGINE_CASE_IDS)
    check_mixed_batch(engine, reference, base_requests=2, only=KERNEL_CASE_IDS)
    families = set().union(*built)
    assert {"hut", "ether", "dct", "surm"} <= families, f"mixed steps took the lean path with {families}"
    assert any(len(b) > 1 for b in built), "a projection with several families' pools took it"


def test_single_hot_adapter_served_merged_matches(tiny_llama):
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok, merged_cache_bytes=1 << 30, merge_after_steps=2)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapter = random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=3)
    key = engine.add_adapter("hot", adapter)
    plan = [(0, [5, 6, 7, 8], "hot"), (0, [9, 10], "hot"), (1, [11, 12, 13], "hot")]
    outs = _run(engine, plan, max_new=8)
    assert "merged" in engine.residency.tier_of(key)
    assert engine.residency.stats.merged_hits > 0
    for i, (_, prompt, _) in enumerate(plan):
        assert_greedy_matches(outs[i], merged_copy(reference, adapter), prompt, 8, f"request {i}")


def test_more_adapters_than_the_device_budget_all_complete(tiny_llama):
    """A step never needs more device room than the budget: admission backs off instead of failing."""
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok)
    adapters = _add_loras(engine, "b", 8, seed=50)
    engine.residency.device_entry(("b0", 1))
    per_adapter = engine.residency.device_used
    engine.residency.device_bytes = 2 * per_adapter
    peak = 0
    plan = [(0, [3 + i, 4, 5], name) for i, name in enumerate(adapters)]
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=3, temperature=0), a) for _, p, a in plan]
    for _ in range(200):
        if not (engine.generator.num_running or engine.generator.num_waiting):
            break
        engine.generator.step()
        peak = max(peak, engine.residency.device_used)
    assert peak <= 2 * per_adapter
    for (_, prompt, name), req in zip(plan, reqs, strict=True):
        events = req.sink.drain()
        assert events[-1].finish_reason == "length", events[-1]
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        assert_greedy_matches(tokens, merged_copy(reference, adapters[name]), prompt, 3, name)


def test_adapter_larger_than_the_device_budget_fails_cleanly(tiny_llama):
    model, tok = tiny_llama
    engine, _ = make_engine(model, tok, device_adapter_bytes=1024)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    engine.add_adapter("big", random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=1))
    req = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0), "big")
    plain = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0), None)
    for _ in range(20):
        engine.generator.step()
    bad, good = req.sink.drain()[-1], plain.sink.drain()[-1]
    assert bad.finish_reason == "error" and "budget" in bad.error
    assert good.finish_reason == "length"
