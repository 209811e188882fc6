"""Prefill chunks sized so that running streams keep their pace.

A step that carries a prefill chunk takes longer than a decode-only step, and every running
stream waits for it: its inter-token latency is that step's time. ``ChunkPacer`` learns, from the
forwards it is shown, what a decode-only step costs and what one prefill token adds, and while
sequences decode it caps the step's prefill tokens so that the step costs at most ``factor`` times
a decode-only step (at least ``min_chunk`` tokens, so a long prompt always advances). With no
sequence decoding there is nobody to slow down and the cap is off (the whole
``max_tokens_per_step``).

The estimates are exponential moving averages of measured times, so the chunk size follows the
machine (a GPU affords far larger chunks than these CPUs) and the batch. Only the *composition* of
steps depends on them, never a token: chunked and one-shot prefill compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkPacer:
    factor: float  # a step with prefill costs at most this many decode-only steps; 0 = no cap
    min_chunk: int = 16
    alpha: float = 0.25  # weight of the newest measurement
    decode_s: float | None = None  # a decode-only forward
    token_s: float | None = None  # what one prefill token adds to a forward

    def observe(self, seconds: float, prefill_tokens: int, decode_rows: int) -> None:
        if prefill_tokens == 0:
            if decode_rows:
                self.decode_s = self._ema(self.decode_s, seconds)
            return
        base = self.decode_s if decode_rows and self.decode_s is not None else 0.0
        self.token_s = self._ema(self.token_s, max(seconds - base, 0.0) / prefill_tokens)

    def cap(self, decoding: bool) -> int | None:
        """The most prefill tokens this step may carry (None: no cap)."""
        if not decoding or self.factor <= 0 or self.decode_s is None or not self.token_s:
            return None
        return max(self.min_chunk, int((self.factor - 1.0) * self.decode_s / self.token_s))

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new
