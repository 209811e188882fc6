"""Rows of one admission with the same prompt and adapter version are prefilled once (``n``
samples of a prompt, repeated prompts), and each still gets what it would get alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from server.engine.generator import hf_forward
from server.engine.kv_batch import RunningBatch

from .test_generator import PROMPTS, _events, _gen, _model, _reference, _req, _run, _tokens
from .test_sampling import byte_tokenizer


def _counting(model):
    """hf_forward that records the batch size of each call."""
    inner, sizes = hf_forward(model), []

    def forward(input_ids, *args, **kw):
        sizes.append(input_ids.shape[0])
        return inner(input_ids, *args, **kw)

    return forward, sizes


def _seq(prompt, key=None):
    return SimpleNamespace(prompt_token_ids=prompt, adapter_key=key)


def test_duplicate_rows_run_once_and_copy_cache_and_logits() -> None:
    model = _model()
    forward, sizes = _counting(model)
    rows = [_seq(PROMPTS[0]), _seq(PROMPTS[3]), _seq(PROMPTS[0]), _seq(PROMPTS[0], key=("a", 1))]
    shared = RunningBatch(forward)
    last, full = shared.prefill_all(rows)
    assert sizes == [3]  # PROMPTS[0] on the base, PROMPTS[3], PROMPTS[0] on ("a", 1)
    plain = RunningBatch(hf_forward(model))
    want_last, want_full = plain.prefill_all([_seq(PROMPTS[0]), _seq(PROMPTS[3])])
    assert torch.equal(last[0], last[2]) and torch.equal(full[0], full[2])  # copies of one row
    # Other batch compositions only reorder float32 sums: eps per term, 1024 terms, at the logits' scale.
    tol = 1024 * torch.finfo(torch.float32).eps * float(want_full.abs().max().clamp_min(1.0))
    torch.testing.assert_close(last[[0, 1]], want_last, rtol=0, atol=tol)
    torch.testing.assert_close(full[[0, 1]], want_full, rtol=0, atol=tol)
    assert shared.attention_mask.tolist()[0] == shared.attention_mask.tolist()[2]
    for layer in shared.cache.layers:
        assert layer.keys.shape[0] == 4 and torch.equal(layer.keys[0], layer.keys[2])
        assert torch.equal(layer.values[0], layer.values[2])


def test_n_greedy_copies_decode_independently_and_equal_generate() -> None:
    """The copied rows then decode as separate rows: a later filter or concat keeps them apart."""
    model, tokenizer = _model(), byte_tokenizer()
    forward, sizes = _counting(model)
    from server.engine.generator import Generator

    gen = Generator(forward, tokenizer, [])
    reqs = [_req(PROMPTS[1], max_new_tokens=n) for n in (3, 9, 6)]  # end at different steps
    gen.submit_many(reqs)
    _run(gen)
    assert sizes[0] == 1  # one prefill row for the three requests
    ref = _reference(model, PROMPTS[1], 9, eos=None)
    for req, n in zip(reqs, (3, 9, 6), strict=True):
        assert _tokens(req) == ref[:n]


def test_seeded_samples_of_one_prompt_equal_each_alone() -> None:
    model, tokenizer = _model(), byte_tokenizer()
    params = dict(max_new_tokens=12, temperature=1.0, top_k=50)
    together = [_req(PROMPTS[3], seed=s, **params) for s in (1, 2, 3)]
    gen = _gen(model, tokenizer)
    gen.submit_many(together)
    _run(gen)
    alone = []
    for s in (1, 2, 3):
        gen = _gen(model, tokenizer)
        alone.append(_req(PROMPTS[3], seed=s, **params))
        gen.submit(alone[-1])
        _run(gen)
    assert [_tokens(r) for r in together] == [_tokens(r) for r in alone]
    assert len({tuple(_tokens(r)) for r in together}) > 1  # the seeds really differ


def test_submit_many_rejects_an_impossible_row_alone() -> None:
    model, tokenizer = _model(), byte_tokenizer()
    gen = _gen(model, tokenizer, max_seq_len=16)
    ok, too_long = _req(PROMPTS[0], max_new_tokens=4), _req(list(range(3, 23)), max_new_tokens=4)
    gen.submit_many([ok, too_long])
    _run(gen)
    assert _events(too_long)[1].finish_reason == "error"
    assert len(_tokens(ok)) == 4
