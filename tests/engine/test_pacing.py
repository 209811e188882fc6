"""Prefill chunks paced to the decode step: the allowance follows the measured costs, and a chunk's
cost grows with its context (its attention), so chunks shrink as a long prompt advances."""

from __future__ import annotations

import pytest

from server.engine.paged.pacing import ChunkPacer


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12)


def test_no_allowance_until_both_costs_are_known_and_none_without_decoding_rows():
    pacer = ChunkPacer(factor=3.0)
    assert pacer.allowance(decoding=True).seconds is None
    pacer.observe(0.040, [], decode_rows=8)  # a decode-only step: 40 ms
    assert pacer.allowance(decoding=True).seconds is None  # no prefill measured yet
    pacer.observe(0.040 + 0.002 * 100, [(100, 0)], decode_rows=8)  # 2 ms per prefill token
    assert pacer.allowance(decoding=False).seconds is None  # nobody to slow down
    allowance = pacer.allowance(decoding=True)
    assert _close(allowance.seconds, 0.080)  # (3 - 1) x 40 ms
    assert allowance.limit(1000, context=0) == 40  # 80 ms / 2 ms per token (one fit: no key term)


def test_factor_zero_turns_pacing_off():
    off = ChunkPacer(factor=0.0)
    off.observe(0.010, [], 4)
    off.observe(0.060, [(50, 0)], 4)
    assert off.allowance(True).limit(4096, 0) == 4096


def test_an_absolute_floor_raises_a_short_steps_allowance_and_never_lowers_a_long_ones():
    """``floor_s``: a step with prefill may take that long whatever the decode step; where the
    relative allowance is larger already, it stands."""
    short = ChunkPacer(factor=2.0, floor_s=0.200, max_share=4)
    short.observe(0.050, [], 1)  # one row decoding: 50 ms
    short.observe(0.050 + 0.002 * 20, [(20, 0)], 1)  # 2 ms a token
    assert _close(short.allowance(True).seconds, 0.150)  # 200 - 50 ms, not (2 - 1) x 50 ms
    assert short.allowance(True).limit(1000, 0) == 75
    assert short.allowance(False).seconds is None  # nobody decodes: no limit, floor or not
    assert short.allowance(True, prompts=4).seconds == pytest.approx(0.200)  # 4 x 50 ms > 150 ms
    long = ChunkPacer(factor=2.0, floor_s=0.200, max_share=4)
    long.observe(0.480, [], 32)  # 32 rows: 480 ms, past the floor on its own
    long.observe(0.480 + 0.002 * 20, [(20, 0)], 32)
    assert _close(long.allowance(True).seconds, 0.480)  # the relative allowance
    assert _close(long.allowance(True, prompts=3).seconds, 3 * 0.480)
    off = ChunkPacer(factor=0.0, floor_s=0.200)  # factor 0: no pacing at all, the floor included
    off.observe(0.050, [], 1)
    off.observe(0.090, [(20, 0)], 1)
    assert off.allowance(True).seconds is None


def test_the_first_chunk_gets_the_floor_and_later_ones_only_what_is_left():
    pacer = ChunkPacer(factor=1.5, min_chunk=16)
    pacer.observe(0.010, [], 4)
    pacer.observe(0.010 + 0.001 * 50, [(50, 0)], 4)  # 1 ms per token
    allowance = pacer.allowance(True)  # 5 ms of prefill
    first = allowance.limit(100, 0)
    assert first == 16  # 5 tokens' worth, raised to the floor so the prompt advances
    allowance.spend(first, 0)
    assert allowance.limit(100, 0) == 0  # the allowance is spent: no second chunk this step
    assert allowance.limit(3, 0) == 0


def test_the_fit_separates_the_three_rates_and_long_contexts_get_shorter_chunks():
    token_s, pair_s, context_s = 2e-4, 1e-7, 5e-6  # per token, per query-key pair, per context token
    pacer = ChunkPacer(factor=2.0)
    pacer.observe(0.030, [], 8)
    context = 0
    for n in (64, 48, 40, 32, 24, 64, 16, 12, 40, 8, 30, 20):  # a long prompt going in
        seconds = n * token_s + n * (context + (n + 1) / 2) * pair_s + context * context_s
        pacer.observe(0.030 + seconds, [(n, context)], 8)
        context += n * 10  # (other steps of the prompt in between)
    assert pacer.token_s == pytest.approx(token_s, rel=1e-6)
    assert pacer.pair_s == pytest.approx(pair_s, rel=1e-6)
    assert pacer.context_s == pytest.approx(context_s, rel=1e-6)
    near, far = pacer.allowance(True).limit(10_000, 0), pacer.allowance(True).limit(10_000, 4000)
    assert far < near / 2  # the same 30 ms buys far fewer tokens at the end of the prompt
    for c, n in ((0, near), (4000, far)):  # each is the longest chunk within the allowance
        assert pacer.cost(n, c) <= 0.030 < pacer.cost(n + 1, c)


def test_a_context_whose_read_alone_exceeds_the_allowance_gets_the_floor():
    pacer = ChunkPacer(factor=2.0, min_chunk=4)
    pacer.decode_s, pacer.token_s, pacer.context_s = 0.030, 1e-4, 1e-5  # 40 ms to read 4,000 tokens
    allowance = pacer.allowance(True)
    assert pacer.tokens_within(0.030, 4000) == 0
    assert allowance.limit(500, 4000) == 4  # the prompt still advances


def test_chunks_at_one_context_fall_back_to_a_per_token_rate():
    pacer = ChunkPacer(factor=2.0)
    pacer.observe(0.020, [], 2)
    for n in (32, 32, 32):  # collinear observations: the key term cannot be told apart
        pacer.observe(0.020 + 0.003 * n, [(n, 0)], 2)
    assert pacer.pair_s == 0.0 and pacer.context_s == 0.0
    assert pacer.token_s == pytest.approx(0.003, rel=1e-9)


def test_decode_estimate_is_a_moving_average():
    pacer = ChunkPacer(factor=2.0, alpha=0.5)
    pacer.observe(0.020, [], 1)
    pacer.observe(0.040, [], 1)
    assert _close(pacer.decode_s, 0.030)
    pacer.observe(0.100, [(100, 0)], 0)  # no decode rows: the whole forward is the prefill's
    assert _close(pacer.token_s, 0.001)


def test_the_allowance_grows_with_the_prompts_in_line_up_to_max_share():
    pacer = ChunkPacer(factor=2.0, max_share=3)
    pacer.observe(0.040, [], decode_rows=2)
    pacer.observe(0.040 + 0.002 * 100, [(100, 0)], decode_rows=2)
    one = pacer.allowance(True, prompts=1).seconds
    assert _close(one, 0.040)  # (2 - 1) x 40 ms
    assert _close(pacer.allowance(True, prompts=0).seconds, one)  # no prompt: as one
    assert _close(pacer.allowance(True, prompts=2).seconds, 2 * one)
    assert _close(pacer.allowance(True, prompts=9).seconds, 3 * one)  # capped
    assert pacer.allowance(False, prompts=9).seconds is None
    assert _close(ChunkPacer(2.0, max_share=1, decode_s=0.04, token_s=0.002).allowance(True, 9).seconds, one)
