"""One request's failure stays with that request, inside a mixed batch (generator level).

A batch of well-formed requests (greedy, seeded sampling, logprobs) shares its prefill and its
decode steps with hostile ones: rows whose scores become NaN / +inf / all ``-inf`` (an injected
forward, keyed by adapter key, as a broken adapter would do), and requests whose own set-up,
sampling-tensor building or stop-string step raises (values that bypassed validation). Every
well-formed request must yield exactly the tokens it yields alone; every hostile one ends with
``"error"``, a message and its ``error_kind``, and ``Generator.error_counts`` counts them.
"""

from __future__ import annotations

import pytest
import torch

from server.engine import sampling
from server.engine.generator import Generator, hf_forward
from server.engine.requests import ERROR_KINDS, GREEDY_BELOW, SamplingParams
from server.engine.sampling import SamplingTensors, make_generator, sample, sample_rows

from .test_generator import PROMPTS, _events, _model, _req, _run
from .test_sampling import byte_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threading only adds overhead (and contention on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def poisoned_forward(model):
    """The model's forward, with the scores of rows keyed ``"nan"`` (prefill), ``"inf"`` (decode
    steps: one entry), ``"all-masked"`` (every entry ``-inf``) and ``"masked"`` (a few entries
    ``-inf``: a usable row) overwritten. Prompts have >= 2 tokens, so ``T == 1`` means decode."""
    base = hf_forward(model)

    def forward(input_ids, attention_mask, position_ids, cache, keys):
        logits = base(input_ids, attention_mask, position_ids, cache, keys).clone()  # [B, 1, V]
        decoding = input_ids.shape[1] == 1
        for row, key in enumerate(keys):
            if key == "nan" and not decoding:
                logits[row, -1] = float("nan")
            elif key == "inf" and decoding:
                logits[row, -1, 7] = float("inf")
            elif key == "all-masked":
                logits[row, -1] = float("-inf")
            elif key == "masked":
                logits[row, -1, 3:40] = float("-inf")
        return logits

    return forward


def _well_formed() -> list[tuple[list[int], object, dict]]:
    """(prompt, adapter key, params) of the requests that must come out as if alone."""
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95)
    return [
        (PROMPTS[0], None, dict(max_new_tokens=9)),
        (PROMPTS[4], None, dict(max_new_tokens=10, seed=11, **sampled)),
        (PROMPTS[3], None, dict(max_new_tokens=12, logprobs=True)),
        (PROMPTS[1], None, dict(max_new_tokens=7, seed=5, logprobs=True, **sampled)),
        (PROMPTS[2], "masked", dict(max_new_tokens=8)),
        ([7, 8, 9], "masked", dict(max_new_tokens=6, seed=3, **sampled)),
    ]


def _alone(model, tokenizer, prompt, key, params) -> list[int]:
    gen = Generator(poisoned_forward(model), tokenizer, [])
    req = _req(prompt, key, **params)
    gen.submit(req)
    _run(gen)
    tokens, fin = _events(req)
    assert fin.finish_reason == "length", fin
    return [e.token_id for e in tokens]


def _hostile() -> dict[str, tuple]:
    """name -> (request, expected error_kind, text in the message, token events before the error)."""
    bad_top_k = _req([5, 6, 7, 8], max_new_tokens=6, temperature=0.8, seed=5)
    bad_top_k.params.top_k = 2**64  # set after validation: a value that slipped through it
    bad_seed = _req([9, 10], max_new_tokens=6, temperature=0.8, seed=1)
    bad_seed.params.seed = 2**70  # the request's generator refuses it at set-up
    bad_stop = _req([11, 12, 13], max_new_tokens=6)
    bad_stop.params.stop = [7]  # not a string: the stop-string step raises on the first token
    return {
        "nan": (_req([3, 4, 5], "nan", max_new_tokens=6), "non_finite", "generated token 1", 0),
        "inf": (_req([6, 7], "inf", max_new_tokens=6), "non_finite", "generated token 2", 1),
        "all-masked": (_req([8, 9, 10], "all-masked", max_new_tokens=6), "non_finite", "NaN or inf", 0),
        "top_k": (bad_top_k, "request", "sampling failed", 0),
        "seed": (bad_seed, "request", "set-up failed", 0),
        "stop": (bad_stop, "request", "TypeError", 0),
    }


def test_hostile_rows_fail_alone_and_the_rest_keep_their_tokens(model, tokenizer) -> None:
    wanted = _well_formed()
    refs = [_alone(model, tokenizer, p, k, params) for p, k, params in wanted]
    gen = Generator(poisoned_forward(model), tokenizer, [], max_batch_size=16)
    good = [_req(p, k, **params) for p, k, params in wanted]
    hostile = _hostile()
    bad = [h[0] for h in hostile.values()]
    for i, req in enumerate(good[:4]):  # all admitted in one prefill, hostile rows interleaved
        gen.submit(req)
        gen.submit(bad[i])
    gen.step()
    gen.step()
    late_bad = _req([14, 15, 16], max_new_tokens=5, temperature=1.0, seed=2)
    late_bad.params.top_k = -(2**70)  # a second wave prefills while the first one decodes
    for req in (good[4], bad[4], good[5], bad[5], late_bad):
        gen.submit(req)
    _run(gen)

    for req, ref in zip(good, refs, strict=True):
        tokens, fin = _events(req)
        assert [e.token_id for e in tokens] == ref, req.adapter_key
        assert fin.finish_reason == "length" and fin.error is None and fin.error_kind is None
        if req.params.logprobs:
            assert all(e.logprob is not None and e.logprob <= 0 for e in tokens)
    late = ("late", (late_bad, "request", "sampling failed", 0))
    for name, (req, kind, text, n_tokens) in [*hostile.items(), late]:
        tokens, fin = _events(req)
        assert (fin.finish_reason, fin.error_kind) == ("error", kind), (name, fin)
        assert fin.error and text in fin.error, (name, fin.error)
        assert len(tokens) == n_tokens == fin.completion_tokens, name
    assert gen.error_counts == {**dict.fromkeys(ERROR_KINDS, 0), "non_finite": 3, "request": 4}
    assert gen.num_running == gen.num_waiting == 0


def test_an_error_in_a_batch_forward_still_fails_that_forward_only(model, tokenizer) -> None:
    """A forward that raises is shared by its rows ("batch"); the requests running meanwhile in
    the other forward of the step go on unchanged."""
    base = hf_forward(model)
    boom = {"on": False}

    def forward(input_ids, *rest):
        if boom["on"] and input_ids.shape[1] > 1:
            raise RuntimeError("prefill exploded")
        return base(input_ids, *rest)

    ref = _alone(model, tokenizer, PROMPTS[0], None, dict(max_new_tokens=8))
    gen = Generator(forward, tokenizer, [])
    running = _req(PROMPTS[0], max_new_tokens=8)
    gen.submit(running)
    gen.step()
    boom["on"] = True
    victims = [_req(PROMPTS[2], max_new_tokens=4), _req(PROMPTS[3], max_new_tokens=4)]
    for req in victims:
        gen.submit(req)
    _run(gen)
    assert [e.token_id for e in _events(running)[0]] == ref
    for req in victims:
        fin = _events(req)[1]
        assert (fin.finish_reason, fin.error_kind) == ("error", "batch") and "exploded" in fin.error
    assert gen.error_counts["batch"] == 2 and gen.error_counts["non_finite"] == 0


# ------------------------------------------------------------------------ sampling, alone


def test_underflowing_temperatures_are_greedy() -> None:
    for t in (1e-45, 5e-324, GREEDY_BELOW / 2, 0.0, -0.0):
        p = SamplingParams(temperature=t, seed=3)
        assert p.greedy and p.temperature == 0.0, t
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


@pytest.mark.parametrize("kwargs", [{"top_k": 2**63}, {"seed": 2**63}, {"seed": -1}])
def test_sampling_params_reject_what_int64_cannot_hold(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(temperature=1.0, **kwargs)


def test_tiny_top_p_and_huge_scores_never_sample_nan() -> None:
    """``top_p`` that is 0 in float32 keeps the best token; scores near float32's max divided by
    the smallest sampled temperature stay finite (the row's best score is subtracted first)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[2] *= 1e37
    logits[3, 5] = float("-inf")
    params = [
        SamplingParams(temperature=1.0, top_p=1e-46, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-45, seed=2),
        SamplingParams(temperature=GREEDY_BELOW, seed=3),
        SamplingParams(temperature=GREEDY_BELOW, seed=4),
    ]
    st = SamplingTensors.from_params(params, [make_generator(p.seed, "cpu") for p in params], "cpu")
    assert float(st.top_p[0]) == 0.0  # the case that used to drop every token
    for _ in range(5):
        assert sample(logits, st).token_ids.tolist() == logits.argmax(-1).tolist()


def test_row_by_row_fallback_rewinds_the_generators(monkeypatch) -> None:
    """When the vectorised attempt fails after drawing its noise, each row is sampled again from
    its generator's state before the attempt: the same draws as if the attempt never happened."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 2
    params = [SamplingParams(temperature=1.0, seed=s) for s in (7, 8, 9)]

    def fresh():
        return [make_generator(p.seed, "cpu") for p in params]

    expected = [
        int(sample(logits[i : i + 1], SamplingTensors.from_params([p], [g], "cpu")).token_ids[0])
        for i, (p, g) in enumerate(zip(params, fresh(), strict=True))
    ]
    real = sampling.sample

    def fails_when_batched(batch_logits, st):
        out = real(batch_logits, st)  # every row's noise is drawn
        if batch_logits.shape[0] > 1:
            raise RuntimeError("late failure")
        return out

    monkeypatch.setattr(sampling, "sample", fails_when_batched)
    gens = fresh()
    out, failed = sample_rows(logits, params, gens, "cpu")
    assert failed == {} and out.token_ids.tolist() == expected

    def second_draw(i: int) -> int:  # what a row would get without the rewind
        st = SamplingTensors.from_params([params[i]], [make_generator(params[i].seed, "cpu")], "cpu")
        real(logits[i : i + 1], st)
        return int(real(logits[i : i + 1], st).token_ids[0])

    assert [second_draw(i) for i in range(len(params))] != expected
