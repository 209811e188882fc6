"""What the PEFT-comparison tests of single families share: a stand-in model whose linears sit
at PEFT-style paths (``layers.<i>.<proj>``, random weights and biases), and the float32 rounding
bound of such a comparison."""

from __future__ import annotations

import torch
from torch import nn

EPS = torch.finfo(torch.float32).eps


class LinearNet(nn.Module):
    """``n_layers`` blocks, each with one ``nn.Linear(in, out)`` per ``{name: (out, in)}`` of ``sides``."""

    def __init__(self, sides: dict[str, tuple[int, int]], seed: int = 0, n_layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            block = nn.Module()
            for name, (out_f, in_f) in sides.items():
                setattr(block, name, nn.Linear(in_f, out_f))
            self.layers.append(block)


def assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, n_terms: int) -> None:
    """float32 worst-case rounding: eps per term of the reductions, relative to the output scale."""
    tol = 4 * n_terms * EPS * expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"
