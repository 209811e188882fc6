"""A request keeps the adapter version it started with; replaced versions are freed after it ends."""

from __future__ import annotations

from server.engine.requests import SamplingParams, TokenEvent

from .helpers import assert_greedy_matches, make_engine, merged_copy, random_adapter


def test_in_flight_request_keeps_its_version_and_old_version_is_freed_after(tiny_llama):
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    v1 = random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=1)
    v2 = random_adapter(
        "ether", {"variant": "etherplus", "side": "auto", "n_blocks": 2}, shapes, weights, seed=2
    )
    engine.add_adapter("x", v1)
    prompt = [7, 8, 9, 10]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    old = engine.submit(prompt, params, "x")
    engine.generator.step()  # prefill + first token on version 1
    engine.add_adapter("x", v2)  # re-upload while the request runs
    new = engine.submit(prompt, params, "x")
    engine.generator.step()
    assert "device" in engine.residency.tier_of(("x", 1))  # still used: not freed yet
    while engine.generator.num_running or engine.generator.num_waiting:
        engine.generator.step()
    engine.generator.step()  # the next step applies pending drops
    tokens = {r.id: [e.token_id for e in r.sink.drain() if isinstance(e, TokenEvent)] for r in (old, new)}
    assert old.adapter_key == ("x", 1) and new.adapter_key == ("x", 2)
    assert_greedy_matches(tokens[old.id], merged_copy(reference, v1), prompt, 6, "v1")
    assert_greedy_matches(tokens[new.id], merged_copy(reference, v2), prompt, 6, "v2")
    assert tokens[old.id] != tokens[new.id]
    assert engine.residency.tier_of(("x", 1)) == []  # freed once its last request ended


def test_deleted_adapter_memory_is_freed_while_idle(tiny_llama):
    import time

    model, tok = tiny_llama
    engine, _ = make_engine(model, tok)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    engine.add_adapter("y", random_adapter("hut", {"r": 1}, shapes, weights, seed=3))
    engine.start()
    try:
        events = list(engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2), "y").sink)
        assert events[-1].finish_reason == "length"
        assert engine.residency.device_used > 0
        engine.forget("y", 1)  # the store deleted it; nothing else is running
        deadline = time.monotonic() + 5
        while engine.residency.device_used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.residency.device_used == 0
    finally:
        engine.stop()
