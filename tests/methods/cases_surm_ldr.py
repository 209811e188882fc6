"""Contract cases of SURM's low-displacement-rank variant ``Σ_i Z_1(g_i) Z_{−1}(h_i)``.

Rank 1 (one circulant times one skew-circulant) and rank 3 (sums in the frequency domain), with
α ≠ 1 so that the scale folded into the slot tables is checked too. Every rank fits N ≥ 24.
"""

from __future__ import annotations

from .cases import Case

CASES = [
    Case("surm-ldr-r1", "surm", {"variant": "ldr", "ldr_rank": 1, "alpha": 1.5}),
    Case("surm-ldr-r3", "surm", {"variant": "ldr", "ldr_rank": 3, "alpha": -1.25}),
]
