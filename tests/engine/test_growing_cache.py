"""``GrowingLayer``: the KV cache layer that writes a decode step's column in place.

Its contents must be those of transformers' ``DynamicLayer`` after any sequence of updates and of
the assignments ``RunningBatch.filter`` / ``concat`` make (pure data movement, so compared exactly),
and a model decoding on it must give the logits it gives on a plain ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from server.engine.kv_batch import GrowingLayer, growing_cache
from tests.conftest import make_tiny_llama


def _kv(g, b, t):
    return torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)


def test_growing_layer_holds_what_dynamic_layer_holds():
    g = torch.Generator().manual_seed(0)
    plain, grow = DynamicLayer(), GrowingLayer()
    ops = [("update", 3, 7)] + [("update", 3, 1)] * 70  # crosses the first growth (GROW columns)
    ops += [("filter", None, None), ("update", 2, 1), ("concat", 4, None)] + [("update", 6, 1)] * 40
    for op, b, t in ops:
        if op == "update":
            k, v = _kv(g, b, t)
            out_p, out_g = plain.update(k, v), grow.update(k, v)
            assert torch.equal(out_p[0], out_g[0]) and torch.equal(out_p[1], out_g[1])
        elif op == "filter":  # as RunningBatch.filter: rows 0 and 2, columns from 5 on
            for layer in (plain, grow):
                layer.keys = layer.keys[torch.tensor([0, 2]), :, 5:, :]
                layer.values = layer.values[torch.tensor([0, 2]), :, 5:, :]
        else:  # as RunningBatch.concat: keys assigned first, then values read and assigned
            k, v = _kv(g, b, plain.keys.shape[2])
            for layer in (plain, grow):
                layer.keys = torch.cat([layer.keys, k])
                layer.values = torch.cat([layer.values, v])
        assert torch.equal(plain.keys, grow.keys) and torch.equal(plain.values, grow.values), op
    assert grow._kbuf.shape[2] > grow.keys.shape[2]  # spare columns: the next step copies nothing


def test_model_decodes_the_same_on_a_growing_cache():
    model = make_tiny_llama(seed=2)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    caches = {"dynamic": DynamicCache(config=model.config), "growing": growing_cache(model.config)}
    assert all(type(layer) is GrowingLayer for layer in caches["growing"].layers)
    tokens = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for _ in range(70):  # past the first growth of the buffers (9 + 1 + GROW columns)
                nxt = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1])
            tokens[name] = torch.stack(steps)
    a, b = tokens["dynamic"], tokens["growing"]
    # Same keys and values; only the attention kernel's view of them differs (strided), which may
    # change its summation order: float32 rounding over a reduction of at most ~90 positions.
    tol = torch.finfo(torch.float32).eps * 1024 * a.abs().max()
    assert (a - b).abs().max() <= tol
    assert torch.equal(a.argmax(-1), b.argmax(-1))
