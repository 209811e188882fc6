"""Contract cases of C3A (block-circulant) and FourierFT (sparse 2-D DFT spectrum), PEFT's types.

Block sizes divide every side of ``SHAPES`` (8, 24, 48); FourierFT's n stays within the smallest
matrix (8 × 24 = 192 positions). Per-module patterns change the stored shapes per module, which
the per-shape contract tests cannot express: tests/methods/test_c3a.py and test_fourierft.py.
"""

from __future__ import annotations

from .cases import Case

CASES = [
    Case("c3a-b8", "c3a", {"block_size": 8}),
    Case("c3a-b4-kaiming", "c3a", {"block_size": 4, "init_weights": "kaiming_uniform"}),
    Case("c3a-b1-gaussian", "c3a", {"block_size": 1, "init_weights": "gaussian"}),  # b = 1: dense
    Case("fourierft-n20", "fourierft", {"n_frequency": 20}),
    Case("fourierft-n100-seed3", "fourierft", {"n_frequency": 100, "scaling": -7.5, "random_loc_seed": 3}),
    Case("fourierft-n192-zeros", "fourierft", {"n_frequency": 192, "scaling": 300.0, "init_weights": True}),
]
