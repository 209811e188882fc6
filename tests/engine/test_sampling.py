"""Unit tests for server.engine.sampling and the request-side helpers (params, detokeniser, stops)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from server.engine.requests import IncrementalDetokenizer, SamplingParams, StopStringBuffer
from server.engine.sampling import SamplingTensors, apply_top_k_top_p, make_generator, sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threading only adds overhead (and contention on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tensors(params: list[SamplingParams], seeds: list[int | None] | None = None) -> SamplingTensors:
    seeds = seeds if seeds is not None else [p.seed for p in params]
    gens = [None if p.greedy else make_generator(s, "cpu") for p, s in zip(params, seeds, strict=True)]
    return SamplingTensors.from_params(params, gens, "cpu")


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ------------------------------------------------------------------------------------ params


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"top_logprobs": 21},
        {"top_logprobs": True},
        {"prompt_logprobs": -1},
        {"prompt_logprobs": 21},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"stop": "abc"},
        {"stop": [""]},
        {"stop": [3]},
        {"seed": 1.5},
    ],
)
def test_sampling_params_rejects_invalid(kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation() -> None:
    p = SamplingParams(temperature=1, top_p=1, stop=("a", "b"))
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ["a", "b"]
    assert not p.greedy and SamplingParams().greedy


# ----------------------------------------------------------------------------------- sampling


def test_greedy_rows_are_argmax_and_untouched_by_sampled_rows() -> None:
    logits = _logits(6)
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5, seed=2),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_p=0.9, seed=3),
    ]
    out = sample(logits, _tensors(params))
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert out.token_ids[greedy].tolist() == logits.argmax(-1)[greedy].tolist()
    assert out.logprobs is None


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    logits = _logits(8, seed=5)
    params = [SamplingParams(temperature=2.0, top_k=1, seed=i) for i in range(4)]
    params += [SamplingParams(temperature=2.0, top_p=1e-6, seed=i) for i in range(4)]
    for _ in range(5):
        out = sample(logits, _tensors(params))
        assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_seeded_draw_does_not_depend_on_batch_position_or_neighbours() -> None:
    target = _logits(1, seed=11)[0]
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=1234)

    def draws(rows: list[torch.Tensor], params: list[SamplingParams], row: int) -> list[int]:
        st = _tensors(params)
        return [int(sample(torch.stack(rows), st).token_ids[row]) for _ in range(20)]

    alone = draws([target], [p], 0)
    others = [SamplingParams(), SamplingParams(temperature=0.5, seed=9), SamplingParams(temperature=1.0)]
    rows = [_logits(1, seed=1)[0], _logits(1, seed=2)[0], target, _logits(1, seed=3)[0]]
    mixed = draws(rows, [others[0], others[1], p, others[2]], 2)
    assert alone == mixed
    different_seed = draws([target], [SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=99)], 0)
    assert different_seed != alone


def test_sampling_matches_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None, :]
    st = _tensors([SamplingParams(temperature=1.0, seed=0)])
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(logits, st).token_ids[0]] += 1
    assert torch.allclose(counts / n, probs, atol=0.03), counts / n


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    st = _tensors([SamplingParams(temperature=0.1, seed=0)])
    picks = [int(sample(logits, st).token_ids[0]) for _ in range(200)]
    assert sum(picks) >= 199  # p(0) = 1 / (1 + e^10) ~ 5e-5


def test_top_k_and_top_p_restrict_support() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()[None, :].repeat(2, 1)
    params = [
        SamplingParams(temperature=1.0, top_k=2, seed=0),
        SamplingParams(temperature=1.0, top_p=0.7, seed=1),
    ]
    st = _tensors(params)
    seen: list[set[int]] = [set(), set()]
    for _ in range(300):
        toks = sample(logits, st).token_ids.tolist()
        for i, t in enumerate(toks):
            seen[i].add(t)
    assert seen[0] == {1, 3}
    assert seen[1] == {1, 3}  # 0.5 < 0.7 keeps the second token; 0.8 >= 0.7 drops the rest


def test_apply_top_k_top_p_per_row() -> None:
    scaled = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    out = apply_top_k_top_p(scaled, torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.7]))
    assert torch.isinf(out[0, 2:]).all() and torch.equal(out[0, :2], scaled[0, :2])
    assert torch.equal(out[1], scaled[1])
    kept = ~torch.isinf(out[2])
    assert kept.tolist() == [False, False, True, True]  # p = .03 .09 .24 .64: mass before 3rd is .88


def test_logprobs_are_raw_model_log_softmax() -> None:
    logits = _logits(3, seed=7)
    params = [
        SamplingParams(logprobs=True),
        SamplingParams(temperature=0.3, top_k=3, logprobs=True, seed=4),
        SamplingParams(temperature=2.0, seed=5),
    ]
    out = sample(logits, _tensors(params))
    assert out.logprobs is not None
    expected = logits.log_softmax(-1).gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert torch.allclose(out.logprobs, expected)
    assert all(lp <= 0 and math.isfinite(lp) for lp in out.logprobs.tolist())


def test_half_precision_logits_are_accepted() -> None:
    logits = _logits(2).to(torch.bfloat16)
    out = sample(logits, _tensors([SamplingParams(logprobs=True), SamplingParams(temperature=1.0, seed=1)]))
    assert out.token_ids.dtype == torch.int64 and out.logprobs is not None
    assert out.logprobs.dtype == torch.float32


# ------------------------------------------------------------------------------------- text

SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer without merges: ids 0-2 are specials, 3-258 the 256 bytes (one token each)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_incremental_detokenizer_multibyte() -> None:
    tokenizer = byte_tokenizer()
    text = "añb€c🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x y", add_special_tokens=False))
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert deltas[:3] == ["a", "", "ñ"] and deltas[-4:] == ["", "", "", "🙂"]
    truncated = IncrementalDetokenizer(tokenizer, [])
    partial = "".join(truncated.push(i) for i in ids[:-1])  # cut inside the emoji
    assert partial == "añb€c" and truncated.flush() == "\ufffd"


def test_stop_string_buffer_holds_back_prefixes() -> None:
    buf = StopStringBuffer(["<|end|>", "###"])
    assert buf.add("hello <|") == ("hello ", False)
    assert buf.add("en") == ("", False)
    assert buf.add("x #") == ("<|enx ", False)
    assert buf.add("#") == ("", False)
    assert buf.add("# tail") == ("", True)
    assert buf.final_text == "hello <|enx "
    assert StopStringBuffer([]).add("abc") == ("abc", False)


def test_logit_bias_per_row_and_raw_logprobs() -> None:
    """A row's logit_bias moves only its own choice (greedy and sampled); log-probabilities and
    top_logprobs stay those of the raw scores; a row without bias is untouched."""
    logits = _logits(3, seed=4)
    target = int(logits[0].argmin())
    params = [
        SamplingParams(logit_bias={target: 100.0}, logprobs=True, top_logprobs=2),
        SamplingParams(logprobs=True),
        SamplingParams(temperature=1.0, logit_bias={7: 100.0}),
    ]
    gens = [None, None, make_generator(3, "cpu")]
    out = sample(logits, SamplingTensors.from_params(params, gens, "cpu"))
    assert out.token_ids.tolist() == [target, int(logits[1].argmax()), 7]
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs[:2], raw[[0, 1], [target, int(logits[1].argmax())]])
    values, ids = out.top
    assert torch.equal(ids[0], raw[0].topk(2).indices) and target not in ids[0].tolist()
    assert torch.allclose(values[0], raw[0].topk(2).values)
