"""Prefill chunks paced to the decode step: the cap follows the measured costs."""

from __future__ import annotations

from server.engine.paged.pacing import ChunkPacer


def test_no_cap_until_both_costs_are_known_and_none_without_decoding_rows():
    pacer = ChunkPacer(factor=3.0)
    assert pacer.cap(decoding=True) is None
    pacer.observe(0.040, prefill_tokens=0, decode_rows=8)  # a decode-only step: 40 ms
    assert pacer.cap(decoding=True) is None  # no prefill measured yet
    pacer.observe(0.040 + 0.002 * 100, prefill_tokens=100, decode_rows=8)  # 2 ms per prefill token
    assert pacer.cap(decoding=False) is None  # nobody to slow down
    assert pacer.cap(decoding=True) == 40  # (3 - 1) x 40 ms / 2 ms


def test_cap_has_a_floor_and_factor_zero_turns_it_off():
    pacer = ChunkPacer(factor=1.5, min_chunk=16)
    pacer.observe(0.010, 0, 4)
    pacer.observe(0.010 + 0.001 * 50, 50, 4)
    assert pacer.cap(True) == 16  # 0.5 x 10 ms / 1 ms = 5, raised to the floor
    off = ChunkPacer(factor=0.0)
    off.observe(0.010, 0, 4)
    off.observe(0.060, 50, 4)
    assert off.cap(True) is None


def test_estimates_are_moving_averages():
    pacer = ChunkPacer(factor=2.0, alpha=0.5)
    pacer.observe(0.020, 0, 1)
    pacer.observe(0.040, 0, 1)
    assert abs(pacer.decode_s - 0.030) < 1e-12
    pacer.observe(0.100, 100, 0)  # no decode rows: the whole forward is the prefill's
    assert abs(pacer.token_s - 0.001) < 1e-12
