"""The paged attention's own kernels against torch's SDPA, in float32, with grouped KV heads.

``decode_attention`` (one query per row, head-major keys ``[H_kv, B, L, D]``, rows of different
lengths masked) and ``chunk_attention`` (a few queries after a cached context, causal from the
context on) compute softmax(q k^T / sqrt(d)) v in another summation order than SDPA: they agree
within float32 rounding over the reduction length.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.paged.attention import SMALL_CHUNK, chunk_attention, decode_attention

H, HK, D = 6, 2, 16


def _tol(length: int) -> float:
    return torch.finfo(torch.float32).eps * 8 * (length + D)


def test_decode_attention_matches_sdpa_per_row():
    g = torch.Generator().manual_seed(0)
    b, length = 5, 37
    q = torch.randn(b, H, D, generator=g)
    k = torch.randn(HK, b, length, D, generator=g)
    v = torch.randn(HK, b, length, D, generator=g)
    lengths = torch.tensor([37, 1, 20, 36, 5])
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    out = decode_attention(q, k, v, mask, None)
    for r in range(b):
        n = int(lengths[r])
        want = F.scaled_dot_product_attention(
            q[r][None, :, None, :], k[:, r, :n][None], v[:, r, :n][None], enable_gqa=True
        )[0, :, 0]
        assert (out[r] - want).abs().max() <= _tol(n)


@pytest.mark.parametrize("context,n", [(1, 1), (7, 3), (40, SMALL_CHUNK), (300, 4)])
def test_chunk_attention_matches_sdpa_with_the_offset_causal_mask(context, n):
    g = torch.Generator().manual_seed(context + n)
    length = context + n
    q = torch.randn(H, n, D, generator=g)
    k = torch.randn(HK, length, D, generator=g)
    v = torch.randn(HK, length, D, generator=g)
    mask = torch.arange(length)[None, :] <= (torch.arange(n)[:, None] + context)
    want = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    got = chunk_attention(q, k, v, context, None)  # [n, H, D]
    assert got.shape == (n, H, D)
    assert (got.transpose(0, 1) - want).abs().max() <= _tol(length)
