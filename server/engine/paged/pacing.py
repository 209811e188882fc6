"""Prefill chunks sized so that running streams keep their pace.

A step that carries a prefill chunk takes longer than a decode-only step, and every running
stream waits for it: its inter-token latency is that step's time. ``ChunkPacer`` learns, from the
forwards it is shown, what a decode-only step costs and what prefill adds to a step, and while
sequences decode it gives each step an *allowance*: prefill may add at most ``factor - 1``
decode-only steps to it. With no sequence decoding there is nobody to slow down and there is no
allowance (the whole ``max_tokens_per_step``).

Requests waiting for their first token are users too. When several prompts are waiting or part
prefilled, the allowance is that many times larger, up to ``max_share`` times: a queue of prompts
then drains instead of growing while one or two streams decode at full pace (one prompt at a time
gets ``factor - 1`` decode steps per step, as before). Running streams pay for it with a longer
step, at most ``1 + max_share * (factor - 1)`` decode-only steps.

A relative allowance is small where a decode step is short: one or two rows on a CPU, or any
batch on a GPU, leave a prompt a few tokens a step and its first token waits for dozens of steps.
``floor_s`` is an absolute inter-token latency that steps with prefill may always reach, whatever
the decode step (the allowance is at least ``floor_s`` minus a decode-only step). It is what a
deployment's latency objective says ("streams keep at least 5 tokens/s": 0.2 s), in the manner of
Sarathi-Serve's token budget derived from its time-between-tokens objective. 0 turns it off.

What a chunk costs depends on its context, not only on its length. Each of its ``n`` tokens runs
through the linear layers (``token_s`` each; the step already streams the weights for its decode
rows), attends to the ``context`` keys before the chunk and to the chunk's own earlier tokens
(``pair_s`` per query-key pair), and the chunk reads its whole context's keys and values once per
layer whatever its length (``context_s`` per cached token). So a chunk costs

    n * token_s + n * (context + (n + 1) / 2) * pair_s + context * context_s

Measured here (bf16, 1 thread, per layer at a 4,000-token context): 4 tokens 1.3 ms, 16 tokens
2.9 ms, 64 tokens 9.7 ms, so a chunk at the end of a long prompt costs several times one at its
start, and part of that cost does not shrink with the chunk. The three rates are a non-negative
least-squares fit over recent forwards, exponentially weighted, with the step's decode-only time
taken off; a rate the observations cannot tell apart from the others (every chunk at the same
context, say) is left out of the fit (0).

The estimates follow the machine (a GPU affords far larger chunks than these CPUs) and the batch.
Only the *composition* of steps depends on them, never a token: chunked and one-shot prefill
compute the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def _pairs(n: int, context: int) -> float:
    """Query-key pairs of a chunk of ``n`` tokens after ``context`` cached ones (causal)."""
    return n * (context + (n + 1) / 2)


@dataclass
class ChunkPacer:
    factor: float  # a step with prefill costs at most this many decode-only steps; 0 = no pacing
    min_chunk: int = 4  # the first chunk of a paced step gets at least this many tokens
    max_share: int = 1  # the allowance grows with the prompts in line, up to this many times
    floor_s: float = 0.0  # steps with prefill may always take this long (0 = relative only)
    alpha: float = 0.25  # weight of the newest decode-only measurement
    fit_alpha: float = 0.1  # weight of the newest prefill measurement in the fit
    decode_s: float | None = None  # a decode-only forward
    token_s: float | None = None  # one prefill token through the linear layers
    pair_s: float = 0.0  # one query-key pair of a chunk's attention
    context_s: float = 0.0  # reading one cached token's keys and values, per chunk
    # exponentially weighted normal equations of the fit over the features (tokens, pairs, context)
    _xx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)], repr=False)
    _xy: list[float] = field(default_factory=lambda: [0.0] * 3, repr=False)

    # ---- learning the costs ------------------------------------------------------------------

    def observe(self, seconds: float, chunks: Sequence[tuple[int, int]], decode_rows: int) -> None:
        """A forward of ``decode_rows`` decode rows and prefill ``chunks`` ((tokens, context) each)
        took ``seconds``."""
        if not chunks:
            if decode_rows:
                self.decode_s = seconds if self.decode_s is None else self._ema(self.decode_s, seconds)
            return
        base = self.decode_s if decode_rows and self.decode_s is not None else 0.0
        y = max(seconds - base, 0.0)
        x = (
            float(sum(n for n, _ in chunks)),
            float(sum(_pairs(n, c) for n, c in chunks)),
            float(sum(c for _, c in chunks)),
        )
        keep = 1.0 - self.fit_alpha
        for i in range(3):
            self._xy[i] = keep * self._xy[i] + x[i] * y
            for j in range(3):
                self._xx[i][j] = keep * self._xx[i][j] + x[i] * x[j]
        self.token_s, self.pair_s, self.context_s = _fit(self._xx, self._xy)

    def _ema(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    # ---- sizing a step's chunks -------------------------------------------------------------

    def cost(self, n: int, context: int) -> float:
        """Estimated seconds a chunk of ``n`` tokens after ``context`` cached ones adds."""
        return n * (self.token_s or 0.0) + _pairs(n, context) * self.pair_s + context * self.context_s

    def tokens_within(self, seconds: float, context: int) -> int:
        """The longest chunk after ``context`` cached tokens that costs at most ``seconds``."""
        seconds -= context * self.context_s  # paid by any chunk there
        if seconds <= 0:
            return 0
        lin = (self.token_s or 0.0) + self.pair_s * (context + 0.5)
        if self.pair_s <= 0:
            return int(seconds / lin) if lin > 0 else 1 << 30
        # pair_s / 2 · n² + lin · n = seconds
        return int((-lin + math.sqrt(lin * lin + 2 * self.pair_s * seconds)) / self.pair_s)

    def allowance(self, decoding: bool, prompts: int = 1) -> StepAllowance:
        """This step's prefill allowance while ``prompts`` prompts wait or are part prefilled
        (unlimited: nothing decodes, pacing is off, or a cost is not known yet)."""
        if not decoding or self.factor <= 0 or self.decode_s is None or self.token_s is None:
            return StepAllowance(self, None)
        share = min(max(prompts, 1), max(self.max_share, 1))
        relative = share * (self.factor - 1.0) * self.decode_s
        return StepAllowance(self, max(relative, self.floor_s - self.decode_s))


def _fit(xx: list[list[float]], xy: list[float]) -> tuple[float, float, float]:
    """Non-negative least squares of (token_s, pair_s, context_s) from the normal equations: the
    fullest subset of the rates (the per-token one always in) that is well determined and
    non-negative; the others 0."""
    for subset in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        a = [[xx[i][j] for j in subset] for i in subset]
        b = [xy[i] for i in subset]
        sol = _solve(a, b)
        if sol is not None and all(v >= 0 for v in sol):
            rates = [0.0, 0.0, 0.0]
            for i, v in zip(subset, sol, strict=True):
                rates[i] = v
            return rates[0], rates[1], rates[2]
    return 0.0, 0.0, 0.0


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``a x = b`` by Gaussian elimination with partial pivoting; None when ``a`` is (nearly)
    singular relative to its diagonal (the features are collinear over the observations)."""
    n = len(b)
    scale = [math.sqrt(a[i][i]) or 1.0 for i in range(n)]  # equilibrate: features differ by 1e6
    m = [[a[i][j] / (scale[i] * scale[j]) for j in range(n)] + [b[i] / scale[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-6:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [u - f * w for u, w in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] / scale[i] for i in range(n)]


@dataclass
class StepAllowance:
    """What prefill one step may still add, in seconds (None: no limit)."""

    pacer: ChunkPacer
    seconds: float | None
    granted: bool = False  # a chunk was scheduled this step

    def limit(self, need: int, context: int) -> int:
        """Tokens a chunk after ``context`` cached ones may take (``need`` at most). The step's
        first chunk gets at least ``min_chunk``, so a long prompt always advances."""
        if self.seconds is None:
            return need
        n = min(need, self.pacer.tokens_within(self.seconds, context))
        if not self.granted:
            n = max(n, min(need, self.pacer.min_chunk))
        return n

    def spend(self, n: int, context: int) -> None:
        """A chunk of ``n`` tokens after ``context`` was scheduled."""
        if n <= 0:
            return
        self.granted = True
        if self.seconds is not None:
            self.seconds -= self.pacer.cost(n, context)
