"""Prompt scoring in the prefill: the log-probabilities of a request's own prompt tokens (and the
best alternatives), through the mixed adapter batch, equal plain transformers on the merged model."""

from __future__ import annotations

import torch

from server.engine.generator import Generator, hf_forward
from server.engine.requests import FinishEvent, GenerationRequest, PromptEvent, SamplingParams, TokenEvent

from .helpers import make_engine, merged_copy, random_adapter

EPS = torch.finfo(torch.float32).eps


def _reference_logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """``[n, V]`` float32 log_softmax of plain transformers' logits for ``prompt`` alone."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return logits.logits[0].float().log_softmax(-1)


def _tolerance(ref: torch.Tensor) -> float:
    """Another summation order (batch shape, threads, SIMD width) moves a float32 logit by about
    eps x (reduction length) x |logit|; the tiny models reduce over at most a few hundred terms, and
    log_softmax adds one logsumexp over the vocabulary."""
    return EPS * 1024 * (1.0 + float(ref.abs().max()))


def _run(engine_or_gen, requests) -> None:
    gen = getattr(engine_or_gen, "generator", engine_or_gen)
    for _ in range(200):
        if not (gen.num_running or gen.num_waiting):
            return
        gen.step()
    raise AssertionError("requests did not finish")


def _check_scores(event: PromptEvent, ref: torch.Tensor, prompt: list[int], k: int, what: str) -> None:
    tol = _tolerance(ref)
    assert event.token_ids == tuple(prompt), what
    assert event.logprobs[0] is None and len(event.logprobs) == len(prompt), what
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]  # [n - 1]
    got = torch.tensor(event.logprobs[1:])
    assert torch.allclose(got, want, atol=tol, rtol=0), f"{what}: {(got - want).abs().max()} > {tol}"
    if k == 0:
        assert event.top_logprobs is None, what
        return
    assert event.top_logprobs is not None and event.top_logprobs[0] is None, what
    for j, top in enumerate(event.top_logprobs[1:]):
        assert len(top) == k, what
        ids, values = [t for t, _ in top], torch.tensor([v for _, v in top])
        assert len(set(ids)) == k and (values[:-1] >= values[1:]).all(), what  # distinct, best first
        best = ref[j].topk(k).values
        assert torch.allclose(values, best, atol=tol, rtol=0), what  # the k best values ...
        assert torch.allclose(values, ref[j, ids], atol=tol, rtol=0), what  # ... of these tokens


def test_prompt_logprobs_mixed_adapters_equal_merged_transformers(tiny_llama):
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok, merged_cache_bytes=0)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapters = {
        "lo": random_adapter("lora", {"r": 4, "lora_alpha": 8}, shapes, weights, seed=1),
        "hu": random_adapter("hut", {"r": 3}, shapes, weights, seed=2),
    }
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    g = torch.Generator().manual_seed(0)
    cases = [  # (adapter, prompt_logprobs, max_new_tokens): scoring rows mixed with plain ones
        ("lo", 5, 0),
        ("hu", 0, 3),
        (None, 20, 0),
        ("lo", None, 4),
        (None, None, 2),
        ("hu", 3, 2),
    ]
    reqs = []
    for adapter, k, max_new in cases:
        prompt = torch.randint(1, 128, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(max_new_tokens=max_new, prompt_logprobs=k)
        reqs.append((prompt, engine.submit(prompt, params, adapter)))
    engine.generator.step()  # one prefill for all six
    assert engine.generator.num_waiting == 0
    _run(engine, reqs)
    for (adapter, k, max_new), (prompt, req) in zip(cases, reqs, strict=True):
        events = req.sink.drain()
        what = f"adapter {adapter}, prompt_logprobs {k}"
        finish = events[-1]
        assert isinstance(finish, FinishEvent) and finish.finish_reason == "length", (what, finish)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert len(tokens) == max_new == finish.completion_tokens, what
        prompts = [e for e in events if isinstance(e, PromptEvent)]
        if k is None:
            assert not prompts, what
            continue
        assert len(prompts) == 1 and events[0] is prompts[0], what  # first, before any token
        ref = _reference_logprobs(merged_copy(reference, adapters.get(adapter)), prompt)
        _check_scores(prompts[0], ref, prompt, k, what)


def test_score_only_fills_the_whole_context(tiny_llama):
    """max_new_tokens 0 needs no position after the prompt: a prompt of exactly the context fits;
    one more token is refused, and so is a generating request of exactly the context."""
    model, tok = tiny_llama
    gen = Generator(hf_forward(model), tok, [2], max_seq_len=8)
    full = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
    reqs = [
        GenerationRequest(prompt_token_ids=list(range(3, 11)), params=full),
        GenerationRequest(prompt_token_ids=list(range(3, 12)), params=full),
        GenerationRequest(prompt_token_ids=list(range(3, 11)), params=SamplingParams(max_new_tokens=1)),
    ]
    for r in reqs:
        gen.submit(r)
    _run(gen, reqs)
    first, too_long, generating = (r.sink.drain() for r in reqs)
    assert isinstance(first[0], PromptEvent) and first[-1].finish_reason == "length"
    assert too_long[-1].finish_reason == "error" and too_long[-1].error_kind == "invalid"
    assert generating[-1].finish_reason == "error" and generating[-1].error_kind == "invalid"


def test_non_finite_prompt_scores_fail_that_request_alone(tiny_llama):
    """A row whose scores at a prompt position are NaN ends with non_finite; its neighbours in the
    same prefill get their scores and tokens as usual."""
    model, tok = tiny_llama
    base = hf_forward(model)

    def forward(input_ids, attention_mask, position_ids, cache, keys, **kw):
        logits = base(input_ids, attention_mask, position_ids, cache, keys, **kw).clone()
        for row, key in enumerate(keys):
            if key == "nan" and logits.shape[1] > 1:
                logits[row, -3] = float("nan")  # a prompt position, not the last one
        return logits

    gen = Generator(forward, tok, [2])
    params = SamplingParams(max_new_tokens=2, prompt_logprobs=2)
    bad = GenerationRequest(prompt_token_ids=[5, 6, 7, 8, 9], params=params, adapter_key="nan")
    good = GenerationRequest(prompt_token_ids=[5, 6, 7, 8, 9], params=params)
    for r in (bad, good):
        gen.submit(r)
    _run(gen, [bad, good])
    bad_events, good_events = bad.sink.drain(), good.sink.drain()
    assert len(bad_events) == 1 and bad_events[0].error_kind == "non_finite", bad_events
    assert "prompt token 4" in bad_events[0].error  # position 2 of 5 scores the 4th token
    assert isinstance(good_events[0], PromptEvent) and good_events[-1].finish_reason == "length"
    ref = _reference_logprobs(model, [5, 6, 7, 8, 9])
    _check_scores(good_events[0], ref, [5, 6, 7, 8, 9], 2, "neighbour")


def test_generated_top_logprobs_equal_transformers(tiny_llama):
    """top_logprobs of generated tokens: k best of the raw distribution, per row's own k; a row that
    does not ask gets none."""
    model, tok = tiny_llama
    engine, reference = make_engine(model, tok)
    prompt = [7, 8, 9, 10]
    asks = engine.submit(prompt, SamplingParams(max_new_tokens=3, logprobs=True, top_logprobs=4))
    plain = engine.submit(prompt, SamplingParams(max_new_tokens=3, logprobs=True))
    _run(engine, [asks, plain])
    tokens = [e for e in asks.sink.drain() if isinstance(e, TokenEvent)]
    others = [e for e in plain.sink.drain() if isinstance(e, TokenEvent)]
    assert all(e.top_logprobs is None for e in others)
    ids = list(prompt)
    for e in tokens:
        ref = _reference_logprobs(reference, ids)[-1]
        tol = _tolerance(ref)
        assert len(e.top_logprobs) == 4
        assert e.top_logprobs[0][0] == e.token_id or abs(e.top_logprobs[0][1] - e.logprob) <= tol  # greedy
        values = torch.tensor([v for _, v in e.top_logprobs])
        assert torch.allclose(values, ref.topk(4).values, atol=tol, rtol=0)
        assert torch.allclose(values, ref[[t for t, _ in e.top_logprobs]], atol=tol, rtol=0)
        ids.append(e.token_id)
