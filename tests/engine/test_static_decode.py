"""Static decode shapes (``server/engine/paged/static.py``): bucketed batches, padded key lists.

A base-only decode step padded into its bucket must give every real row the tokens and log
probabilities of the packed step, and its padding rows must never touch a sequence's KV (they
write and read the cache's scratch slot, outside every block). Steps that involve an adapter or
a prefill chunk keep the packed path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from server.engine.paged.static import batch_buckets
from server.engine.requests import FinishEvent, SamplingParams, TokenEvent

from .helpers import TIE_MARGIN, assert_greedy_matches, make_engine, merged_copy, random_adapter


def _engine(tiny_llama, **overrides):
    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    return make_engine(model, tok, kv_block_size=4, **overrides)


def _prompt(n, seed=0):
    return [(seed * 31 + 7 * i) % 120 + 1 for i in range(n)]


def _run(engine, jobs):
    """Submit ``(prompt, params, adapter)`` jobs, drain the engine, return each one's tokens."""
    reqs = [engine.submit(p, params, adapter_id=a) for p, params, a in jobs]
    gen = engine.generator
    for _ in range(2000):
        if not (gen.num_running or gen.num_waiting):
            break
        gen.step()
    gen.pool.check()
    assert gen.pool.num_in_use == 0, "blocks leaked"
    out = []
    for r in reqs:
        events = r.sink.drain()
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length", events[-1]
        out.append([e for e in events if isinstance(e, TokenEvent)])
    return out


def test_batch_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_padded_buckets_give_the_packed_steps_tokens_and_log_probs(tiny_llama):
    # Five rows of different lengths and lifetimes: the batch shrinks through buckets 8, 4, 2, 1
    # as rows finish, and the key lists cross several multiples of the key padding.
    lengths, news = [3, 9, 17, 5, 30], [20, 4, 12, 7, 16]
    jobs = [
        (_prompt(n, i), SamplingParams(max_new_tokens=m, temperature=0, logprobs=True), None)
        for i, (n, m) in enumerate(zip(lengths, news, strict=True))
    ]
    packed, reference = _engine(tiny_llama)
    static, _ = _engine(tiny_llama, static_decode="eager")
    want, got = _run(packed, jobs), _run(static, jobs)
    counts = static.static_decode.steps
    assert {8, 4, 2, 1} <= set(counts), counts  # every bucket the shrinking batch passes through
    for (prompt, params, _), w, g in zip(jobs, want, got, strict=True):
        assert [t.token_id for t in g] == [t.token_id for t in w]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(w, g, strict=True)) <= TIE_MARGIN * 8
        assert_greedy_matches(
            [t.token_id for t in g], merged_copy(reference, None), prompt, params.max_new_tokens
        )


def test_steps_with_an_adapter_keep_the_packed_path(tiny_llama):
    engine, reference = _engine(tiny_llama, static_decode="eager")
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapter = random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=3)
    engine.add_adapter("a", adapter)
    prompt = _prompt(6, 2)
    (toks,) = _run(engine, [(prompt, SamplingParams(max_new_tokens=10, temperature=0), "a")])
    assert engine.static_decode.steps == {}, "an adapter step went through the base-only path"
    assert_greedy_matches([t.token_id for t in toks], merged_copy(reference, adapter), prompt, 10)


def test_padding_rows_touch_only_the_scratch_slot(tiny_llama):
    engine, _ = _engine(tiny_llama, static_decode="eager")
    kv = engine.generator.kv
    for layer in kv.keys + kv.values:
        layer[:, : kv.scratch_slot].fill_(
            float("nan")
        )  # [H_kv, slots, D]  # a read of any unwritten block slot shows
    jobs = [
        (_prompt(4 + i, i), SamplingParams(max_new_tokens=6, temperature=0, logprobs=True), None)
        for i in range(3)
    ]
    for toks in _run(engine, jobs):  # 3 rows: bucket 4, one padding row
        assert all(torch.isfinite(torch.tensor(t.logprob)) for t in toks)
    assert 4 in engine.static_decode.steps


@pytest.mark.slow
def test_compiled_buckets_give_the_eager_tokens(tiny_llama):
    """torch.compile of the static decode (one graph per bucket): the eager path's tokens."""
    jobs = [
        (_prompt(5 + 3 * i, i), SamplingParams(max_new_tokens=8, temperature=0, logprobs=True), None)
        for i in range(2)
    ]
    eager, _ = _engine(tiny_llama, static_decode="eager", max_batch_size=2)
    compiled, _ = _engine(tiny_llama, static_decode="compiled", max_batch_size=2)
    assert set(compiled.static_decode.compile_seconds) == {1, 2}  # warmed up at start
    for w, g in zip(_run(eager, jobs), _run(compiled, jobs), strict=True):
        assert [t.token_id for t in g] == [t.token_id for t in w]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(w, g, strict=True)) <= TIE_MARGIN * 8
