"""PEFT's BOFT as it runs where its CUDA extension builds, for tests on any machine.

PEFT builds BOFT's butterfly factors only when its ``fbd_cuda`` extension compiles (ninja, nvcc);
elsewhere it silently keeps one factor, and on a machine where it does compile it would build it
at model creation. ``butterfly_peft()`` stands in for the extension with what it computes (a
batched block diagonal, in torch), so a PEFT BOFT model built and run inside it is the same on
every machine: the one PEFT computes with its extension."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class TorchBlockDiag:
    """``fbd_cuda``'s op: ``[m, k, bs, bs] -> [m, k·bs, k·bs]`` block diagonals."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


@contextlib.contextmanager
def butterfly_peft() -> Iterator[None]:
    """Build and run PEFT BOFT models inside this (creation and forward both read the stand-in)."""
    import peft.tuners.boft.layer as boft_layer

    saved = boft_layer._FBD_CUDA, boft_layer.FastBlockDiag
    boft_layer._FBD_CUDA, boft_layer.FastBlockDiag = True, TorchBlockDiag  # "loaded": no build attempt
    try:
        yield
    finally:
        boft_layer._FBD_CUDA, boft_layer.FastBlockDiag = saved
