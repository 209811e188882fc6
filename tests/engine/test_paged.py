"""The paged engine: chunked prefill, preemption, the prefix cache across adapter versions, leaks.

Every scenario ends with the block pool's consistency check and no block in use: a sequence that
finishes, fails or is cancelled gives its blocks back.
"""

from __future__ import annotations

import copy

import pytest

from server.engine.paged.generator import PagedGenerator
from server.engine.requests import FinishEvent, SamplingParams, TokenEvent

from .helpers import TIE_MARGIN, assert_greedy_matches, make_engine, merged_copy, random_adapter

LORA = {"r": 4, "lora_alpha": 8}


def _engine(tiny_llama, **overrides):
    """A paged engine on a fresh copy of the tiny model (``make_engine`` wraps the model it gets)."""
    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    engine, reference = make_engine(model, tok, kv_block_size=4, **overrides)
    assert isinstance(engine.generator, PagedGenerator)
    return engine, reference


def _adapter(engine, seed, family="lora", config=LORA):
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    return random_adapter(family, config, shapes, weights, seed=seed)


def _drain(engine, reqs, limit=2000):
    gen = engine.generator
    for _ in range(limit):
        if not (gen.num_running or gen.num_waiting):
            break
        gen.step()
    assert not (gen.num_running or gen.num_waiting), "the engine did not finish"
    gen.pool.check()
    assert gen.pool.num_in_use == 0, "blocks leaked"
    out = []
    for r in reqs:
        events = r.sink.drain()
        assert isinstance(events[-1], FinishEvent), events[-1]
        out.append((events[-1], [e for e in events if isinstance(e, TokenEvent)]))
    return out


def _prompt(n, seed=0):
    return [(seed * 31 + 7 * i) % 120 + 1 for i in range(n)]


def _logprob_gap(a, b):
    return max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True))


def test_chunked_prefill_gives_the_one_shot_tokens_and_log_probs(tiny_llama):
    prompt = _prompt(70)
    params = SamplingParams(max_new_tokens=8, temperature=0, logprobs=True)
    results = {}
    for budget in (4096, 16):  # one shot / chunks of at most 16 tokens (prefill spans 5 steps)
        engine, reference = _engine(tiny_llama, max_tokens_per_step=budget)
        ((fin, toks),) = _drain(engine, [engine.submit(prompt, params)])
        assert fin.finish_reason == "length"
        got = [t.token_id for t in toks]
        assert_greedy_matches(got, merged_copy(reference, None), prompt, 8, f"budget {budget}")
        results[budget] = toks
    one, chunked = results[4096], results[16]
    assert [t.token_id for t in one] == [t.token_id for t in chunked]
    assert _logprob_gap(one, chunked) <= TIE_MARGIN * 8


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled_in_chunks(tiny_llama):
    engine, reference = _engine(tiny_llama, max_tokens_per_step=16)
    gen = engine.generator
    short = engine.submit(_prompt(5, 1), SamplingParams(max_new_tokens=30, temperature=0))
    gen.step()
    long = engine.submit(_prompt(120, 2), SamplingParams(max_new_tokens=4, temperature=0))
    steps_with_both = 0
    while long.sink.drain() == [] and gen.num_running:
        stats = gen.step()
        if stats.prefill_tokens and stats.decode_tokens:
            steps_with_both += 1
            assert stats.prefill_tokens + stats.decode_tokens <= 16
    assert steps_with_both >= 120 // 16  # the prompt went in chunks beside the decoding stream
    (fin_s, toks_s), _ = _drain(engine, [short, long])
    assert_greedy_matches([t.token_id for t in toks_s], merged_copy(reference, None), _prompt(5, 1), 30)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_preempted_sequences_resume_with_the_tokens_they_would_have_had(tiny_llama, temperature):
    prompts = [_prompt(9 + 3 * i, i) for i in range(6)]

    def run(kv_bytes):
        engine, _ = _engine(tiny_llama, kv_cache_bytes=kv_bytes, max_tokens_per_step=64)
        a = _adapter(engine, seed=5)
        engine.add_adapter("a", a)
        reqs = [
            engine.submit(
                p,
                SamplingParams(max_new_tokens=24, temperature=temperature, seed=100 + i, logprobs=True),
                "a" if i % 2 else None,
            )
            for i, p in enumerate(prompts)
        ]
        return engine, _drain(engine, reqs)

    per_token = 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 KV heads, head dim 8, float32
    roomy, alone = run(1 << 20)
    tight, squeezed = run(per_token * 4 * 16)  # 16 blocks of 4 tokens: not enough for all six
    assert roomy.generator.preemptions == 0 and tight.generator.preemptions > 0
    for (fa, ta), (fb, tb) in zip(alone, squeezed, strict=True):
        assert fa.finish_reason == fb.finish_reason == "length"
        assert [t.token_id for t in ta] == [t.token_id for t in tb]
        assert _logprob_gap(ta, tb) <= TIE_MARGIN * 8


def test_prefix_cache_hits_only_the_same_adapter_version(tiny_llama):
    engine, reference = _engine(tiny_llama)
    pool = engine.generator.pool
    v1 = _adapter(engine, seed=1)
    engine.add_adapter("x", v1)
    system = _prompt(40, 3)
    params = SamplingParams(max_new_tokens=5, temperature=0)

    ((_, first),) = _drain(engine, [engine.submit(system + [5, 6], params, "x")])
    hits = pool.stats.hit_blocks
    ((_, again),) = _drain(engine, [engine.submit(system + [5, 6], params, "x")])
    assert pool.stats.hit_blocks - hits == 10  # 42 tokens: 10 full blocks of 4 reused
    assert [t.token_id for t in again] == [t.token_id for t in first]

    hits = pool.stats.hit_blocks
    ((_, base),) = _drain(engine, [engine.submit(system + [5, 6], params)])  # the base model: no hit
    assert pool.stats.hit_blocks == hits
    assert_greedy_matches([t.token_id for t in base], merged_copy(reference, None), system + [5, 6], 5)

    v2 = _adapter(engine, seed=2, family="hut", config={"r": 1})
    engine.add_adapter("x", v2)  # replaced: version 1's blocks never match again
    hits = pool.stats.hit_blocks
    ((_, new),) = _drain(engine, [engine.submit(system + [5, 6], params, "x")])
    assert pool.stats.hit_blocks == hits
    assert_greedy_matches([t.token_id for t in new], merged_copy(reference, v2), system + [5, 6], 5, "v2")
    assert not any(e.root == ("x", 1) for e in pool._entry.values())


def test_a_version_replaced_mid_flight_keeps_its_blocks_private(tiny_llama):
    engine, reference = _engine(tiny_llama)
    gen, pool = engine.generator, engine.generator.pool
    v1, v2 = _adapter(engine, seed=1), _adapter(engine, seed=2)
    engine.add_adapter("x", v1)
    prompt = _prompt(33, 4)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    old = engine.submit(prompt, params, "x")
    gen.step()  # version 1 prefilled: its 8 full blocks are registered
    engine.add_adapter("x", v2)
    hits = pool.stats.hit_blocks
    new = engine.submit(prompt, params, "x")
    (_, t_old), (_, t_new) = _drain(engine, [old, new])
    assert pool.stats.hit_blocks == hits  # version 2 computed its own
    assert_greedy_matches([t.token_id for t in t_old], merged_copy(reference, v1), prompt, 6, "v1")
    assert_greedy_matches([t.token_id for t in t_new], merged_copy(reference, v2), prompt, 6, "v2")


def test_n_samples_of_a_prompt_share_its_full_blocks(tiny_llama):
    engine, _ = _engine(tiny_llama)
    gen, pool = engine.generator, engine.generator.pool
    prompt = _prompt(41, 5)  # 10 full blocks and one token
    reqs = engine.submit_many(
        [(prompt, SamplingParams(max_new_tokens=6, temperature=0.8, seed=s), None) for s in range(4)], None
    )
    gen.step()
    assert pool.num_in_use == 10 + 4  # the shared prefix once, each sample's own last block
    outs = _drain(engine, reqs)
    for seed, (_, toks) in enumerate(outs):  # each sample equals the same request run alone
        ((_, alone),) = _drain(
            engine, [engine.submit(prompt, SamplingParams(max_new_tokens=6, temperature=0.8, seed=seed))]
        )
        assert [t.token_id for t in toks] == [t.token_id for t in alone]


def test_prompt_longer_than_the_kv_cache_is_refused_naming_both_numbers(tiny_llama):
    per_token = 2 * 2 * 2 * 8 * 4
    engine, _ = _engine(tiny_llama, kv_cache_bytes=per_token * 4 * 5)  # 5 blocks = 20 tokens
    ((fin, toks),) = _drain(engine, [engine.submit(_prompt(30), SamplingParams(max_new_tokens=2))])
    assert fin.finish_reason == "error" and fin.error_kind == "invalid" and not toks
    assert "30 tokens" in fin.error and "20 tokens" in fin.error


def test_kv_bytes_in_use_are_the_tokens_rounded_up_to_blocks(tiny_llama):
    engine, _ = _engine(tiny_llama)
    gen = engine.generator
    lengths = [5, 17, 33]
    reqs = [engine.submit(_prompt(n, n), SamplingParams(max_new_tokens=3, temperature=0)) for n in lengths]
    gen.step()
    per_token = 2 * 2 * 2 * 8 * 4
    assert gen.kv_bytes_in_use() == sum(-(-n // 4) * 4 for n in lengths) * per_token
    _drain(engine, reqs)


def test_cancelled_and_failed_sequences_give_their_blocks_back(tiny_llama):
    engine, _ = _engine(tiny_llama)
    gen = engine.generator
    a = engine.submit(_prompt(20), SamplingParams(max_new_tokens=50))
    b = engine.submit(_prompt(20, 1), SamplingParams(max_new_tokens=50))
    gen.step()
    assert gen.pool.num_in_use > 0
    a.cancel()
    forward = gen.forward

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    gen.step()
    gen.forward = broken
    gen.step()
    gen.forward = forward
    (fa, _), (fb, _) = _drain(engine, [a, b])
    assert fa.finish_reason == "cancelled" and fb.finish_reason == "error"


def _frozen_pacer(gen):
    """The generator's pacer with frozen estimates: 10 ms a decode step, 1 ms a token, 10 us a
    query-key pair (the steps' composition then follows from the settings alone)."""
    pacer = gen.pacer
    pacer.decode_s, pacer.token_s, pacer.pair_s, pacer.context_s = 0.010, 0.001, 1e-5, 0.0
    pacer.observe = lambda *args, **kwargs: None
    return pacer


def test_prefill_is_paced_to_the_decode_step_while_rows_decode(tiny_llama):
    engine, reference = _engine(tiny_llama, max_tokens_per_step=4096, prefill_itl_factor=3.0)
    gen = engine.generator
    short = engine.submit(_prompt(5, 1), SamplingParams(max_new_tokens=6, temperature=0))
    gen.step()
    pacer = _frozen_pacer(gen)
    long = engine.submit(_prompt(150, 2), SamplingParams(max_new_tokens=3, temperature=0))
    chunks = []
    while gen.num_running or gen.num_waiting:
        stats = gen.step()
        if stats.prefill_tokens:
            chunks.append((stats.prefill_tokens, stats.decode_tokens))
    assert sum(p for p, _ in chunks) == 150
    paced = [p for p, d in chunks if d]  # while the short stream decodes
    assert len(paced) >= 3
    context = 0
    for n in paced:  # each the longest chunk within (3 - 1) x 10 ms at its context
        assert pacer.cost(n, context) <= 0.020 < pacer.cost(n + 1, context), (n, context)
        context += n
    assert paced == sorted(paced, reverse=True) and paced[-1] < paced[0]  # shorter as it advances
    assert any(p > paced[0] for p, d in chunks if not d)  # the rest in one piece once it is done
    (_, toks_l), (_, toks_s) = _drain(engine, [long, short])
    assert_greedy_matches([t.token_id for t in toks_l], merged_copy(reference, None), _prompt(150, 2), 3)


@pytest.mark.parametrize("max_share", [1, 4])
def test_prompts_in_line_share_a_larger_allowance(tiny_llama, max_share):
    """Two prompts waiting beside a decoding stream get two shares of the allowance (at most
    ``prefill_max_share``); the tokens stay those of one-shot prefill."""
    engine, reference = _engine(
        tiny_llama, max_tokens_per_step=4096, prefill_itl_factor=3.0, prefill_max_share=max_share
    )
    gen = engine.generator
    short = engine.submit(_prompt(5, 1), SamplingParams(max_new_tokens=8, temperature=0))
    gen.step()
    pacer = _frozen_pacer(gen)
    longs = [engine.submit(_prompt(150, s), SamplingParams(max_new_tokens=2, temperature=0)) for s in (2, 3)]
    stats = gen.step()
    shares = min(2, max_share)
    assert stats.decode_tokens == 1
    assert stats.prefill_tokens == pacer.tokens_within(shares * 0.020, 0)  # all to the first in line
    *outs, _ = _drain(engine, [*longs, short])
    for seed, (_, toks) in zip((2, 3), outs, strict=True):
        ids = [t.token_id for t in toks]
        assert_greedy_matches(ids, merged_copy(reference, None), _prompt(150, seed), 2)


def test_an_itl_floor_from_the_settings_widens_a_short_steps_chunk(tiny_llama):
    """``prefill_itl_floor_ms`` reaches the pacer: beside a 10 ms decode step, a 60 ms floor
    leaves 50 ms of prefill (factor 2 alone: 10 ms); the tokens stay those of one-shot prefill."""
    engine, reference = _engine(
        tiny_llama, max_tokens_per_step=4096, prefill_itl_factor=2.0, prefill_itl_floor_ms=60.0
    )
    gen = engine.generator
    short = engine.submit(_prompt(5, 1), SamplingParams(max_new_tokens=4, temperature=0))
    gen.step()
    pacer = _frozen_pacer(gen)
    long = engine.submit(_prompt(150, 2), SamplingParams(max_new_tokens=2, temperature=0))
    stats = gen.step()
    assert stats.decode_tokens == 1
    assert stats.prefill_tokens == pacer.tokens_within(0.050, 0) > 2 * pacer.tokens_within(0.010, 0)
    (_, toks), _ = _drain(engine, [long, short])
    assert_greedy_matches([t.token_id for t in toks], merged_copy(reference, None), _prompt(150, 2), 2)


def test_no_unwritten_slot_is_ever_read(tiny_llama):
    """The cache starts uninitialised: NaN in every slot must never reach a result (decode rows of
    different lengths are padded, prefixes are shared and reused)."""
    engine, reference = _engine(tiny_llama, kv_cache_bytes=2 * 2 * 2 * 8 * 4 * 4 * 100)  # 100 blocks of 4
    for t in engine.generator.kv.keys + engine.generator.kv.values:
        t.fill_(float("nan"))
    prompts = [_prompt(n, n) for n in (3, 9, 17, 9)] + [_prompt(9, 9) + [5, 6]]  # a shared prefix
    params = SamplingParams(max_new_tokens=6, temperature=0)
    for _ in range(2):  # the second round reuses cached blocks of the first
        outs = _drain(engine, [engine.submit(p, params) for p in prompts])
        for p, (fin, toks) in zip(prompts, outs, strict=True):
            assert fin.finish_reason == "length", fin.error
            assert_greedy_matches([t.token_id for t in toks], merged_copy(reference, None), p, 6)


@pytest.mark.parametrize("max_new", [0, 3])
def test_a_scored_prompt_whose_last_chunk_is_one_token_is_scored_whole(tiny_llama, max_new):
    """17 prompt tokens in chunks of 16 leave one: that token is still part of the prompt's
    scoring (every position's logits), not a decode row."""
    from server.engine.requests import PromptEvent

    prompt = _prompt(17, 4)
    params = SamplingParams(max_new_tokens=max_new, temperature=0, prompt_logprobs=0)
    scored = {}
    for budget in (4096, 16):  # one shot / a 16-token chunk then a 1-token one
        engine, _ = _engine(tiny_llama, max_tokens_per_step=budget)
        req = engine.submit(prompt, params)
        gen = engine.generator
        while gen.num_running or gen.num_waiting:
            gen.step()
        events = req.sink.drain()
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length", events[-1]
        (prompt_event,) = [e for e in events if isinstance(e, PromptEvent)]
        assert len(prompt_event.logprobs) == 17 and prompt_event.logprobs[0] is None
        scored[budget] = prompt_event.logprobs[1:]
        gen.pool.check()
        assert gen.pool.num_in_use == 0
    assert max(abs(a - b) for a, b in zip(scored[4096], scored[16], strict=True)) <= TIE_MARGIN * 8
