"""Continuous batching: exactness against HF generate, seeds, stop strings, cancel, FIFO, logprobs.

Two fakes keep this fast and offline: a tiny random ``LlamaForCausalLM`` (real attention, real
DynamicCache) and the in-memory byte-level tokenizer of ``test_sampling`` (every byte is one
token, so multi-byte characters and stop strings always span several tokens). Text tests use a
scripted forward that emits a fixed token script per adapter key, so the text is known in advance.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.cache_utils import DynamicCache

from server.engine.generator import Generator, StepStats, hf_forward
from server.engine.kv_batch import RunningBatch
from server.engine.requests import (
    AsyncStream,
    BlockingStream,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

from .test_sampling import byte_tokenizer

EOS = 2  # "</s>" in byte_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threading only adds overhead (and contention on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def _model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        initializer_range=0.2, attn_implementation=attn,  # peaked logits: no near-ties for greedy checks
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _model()


def _gen(model, tokenizer, eos=(), **kw) -> Generator:
    return Generator(hf_forward(model), tokenizer, eos, **kw)


def _req(prompt: list[int], key: Hashable = None, **params) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=prompt, params=SamplingParams(**params), adapter_key=key)


def _run(gen: Generator, max_steps: int = 500) -> list[StepStats]:
    stats = []
    while gen.num_running or gen.num_waiting:
        stats.append(gen.step())
        assert len(stats) < max_steps
    return stats


_DRAINED: dict[str, list] = {}


def _events(req: GenerationRequest) -> tuple[list[TokenEvent], FinishEvent]:
    """All events of a finished request (drained once, remembered for later calls)."""
    assert isinstance(req.sink, BlockingStream)
    events = _DRAINED.setdefault(req.id, [])
    events += req.sink.drain()
    assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[:-1], events[-1]  # type: ignore[return-value]


def _tokens(req: GenerationRequest) -> list[int]:
    return [e.token_id for e in _events(req)[0]]


def _reference(model, prompt: list[int], n: int, eos: int | None = EOS) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 6, 7], [9] * 11, [3, 4], [10, 11, 12, 13, 14, 15], list(range(40, 60))]


# --------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_continuous_batching_equals_generate_alone(attn: str, tokenizer) -> None:
    model = _model(attn)
    eos = _reference(model, PROMPTS[1], 12, eos=None)[6]  # make one request end on EOS mid-way
    budgets = [9, 12, 15, 7, 20]
    refs = [_reference(model, p, n, eos=eos) for p, n in zip(PROMPTS, budgets, strict=True)]
    gen = _gen(model, tokenizer, eos=[eos], max_batch_size=4)
    reqs = [_req(p, max_new_tokens=n) for p, n in zip(PROMPTS, budgets, strict=True)]
    gen.submit(reqs[0])
    gen.submit(reqs[1])
    for _ in range(3):
        gen.step()
    gen.submit(reqs[2])
    gen.step()
    gen.submit(reqs[3])
    gen.submit(reqs[4])  # waits for a free row (max_batch_size=4)
    _run(gen)
    for req, ref in zip(reqs, refs, strict=True):
        tokens, fin = _events(req)
        assert [e.token_id for e in tokens] == ref
        assert fin.finish_reason == ("eos" if ref[-1] == eos else "length")
        assert fin.completion_tokens == len(ref) and fin.prompt_tokens == len(req.prompt_token_ids)
    assert any(r[-1] == eos for r in refs)


def test_filter_trims_padding_columns(model) -> None:
    seq = lambda prompt: SimpleNamespace(prompt_token_ids=prompt, adapter_key=None)  # noqa: E731
    batch: RunningBatch = RunningBatch(hf_forward(model))
    logits = batch.prefill([seq([1, 2]), seq(list(range(3, 13))), seq([4, 5, 6])])
    assert logits.shape == (3, 259) and batch.seq_len == 10
    batch.set_next_tokens(logits.argmax(-1))
    batch.filter([2, 0])  # drop the long row: 7 columns are padding for everyone left
    assert batch.seq_len == 3 and batch.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.cache is not None and batch.cache.layers[0].keys.shape[:3] == (2, 2, 3)
    batch.filter([])
    assert len(batch) == 0 and batch.cache is None


def test_non_dynamic_cache_is_a_clear_error(tokenizer) -> None:
    def forward(input_ids, attention_mask, position_ids, cache, keys):  # writes nothing to the cache
        return torch.zeros(*input_ids.shape, 259)

    gen, req = Generator(forward, tokenizer, [EOS]), _req([1, 2, 3])
    gen.submit(req)
    _run(gen)
    assert "UnsupportedCacheError" in (_events(req)[1].error or "")


# ------------------------------------------------------------------------------------- seeds


def test_seeded_sampling_is_batch_independent(model, tokenizer) -> None:
    params = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    gen = _gen(model, tokenizer, eos=[])
    alone = _req(PROMPTS[3], seed=1234, **params)
    gen.submit(alone)
    _run(gen)

    gen = _gen(model, tokenizer, eos=[])
    others = [_req(PROMPTS[0], max_new_tokens=20), _req(PROMPTS[4], seed=7, **params)]
    batched = _req(PROMPTS[3], seed=1234, **params)
    gen.submit(others[0])
    gen.step()
    gen.submit(batched)
    gen.step()
    gen.submit(others[1])
    _run(gen)
    assert _tokens(alone) == _tokens(batched)

    gen = _gen(model, tokenizer, eos=[])
    other_seed = _req(PROMPTS[3], seed=4321, **params)
    gen.submit(other_seed)
    _run(gen)
    assert _tokens(other_seed) != _tokens(alone)


def test_top_k_one_equals_greedy(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, eos=[])
    greedy = _req(PROMPTS[2], max_new_tokens=12)
    top1 = _req(PROMPTS[2], max_new_tokens=12, temperature=1.5, top_k=1)
    gen.submit(greedy)
    gen.submit(top1)
    _run(gen)
    assert _tokens(top1) == _tokens(greedy) == _reference(model, PROMPTS[2], 12, eos=None)


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_equal_log_softmax_of_a_plain_forward(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, eos=[])
    reqs = [_req(PROMPTS[0], max_new_tokens=8, logprobs=True), _req(PROMPTS[3], max_new_tokens=6)]
    reqs.append(_req(PROMPTS[1], max_new_tokens=8, logprobs=True, temperature=0.8, seed=3))
    for r in reqs:
        gen.submit(r)
        gen.step()
    _run(gen)
    for req in (reqs[0], reqs[2]):
        tokens, _ = _events(req)
        ids = req.prompt_token_ids + [e.token_id for e in tokens]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
        n = len(req.prompt_token_ids)
        expected = logits[n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(ids[n:])[:, None]).squeeze(-1)
        got = torch.tensor([e.logprob for e in tokens])
        assert torch.allclose(got, expected, atol=1e-5)
    assert all(e.logprob is None for e in _events(reqs[1])[0])


# ------------------------------------------------------------------------- scheduling


def test_max_batch_size_and_fifo_across_adapters(model, tokenizer) -> None:
    prefill_keys: list[list[Hashable]] = []
    base = hf_forward(model)

    def forward(input_ids, attention_mask, position_ids, cache, keys):
        assert len(keys) == input_ids.shape[0]
        if input_ids.shape[1] > 1 or cache.get_seq_length() == 0:
            prefill_keys.append(list(keys))
        return base(input_ids, attention_mask, position_ids, cache, keys)

    gen = Generator(forward, tokenizer, [], max_batch_size=2, max_tokens_per_step=1000)
    keys = ["b", "a", "b", None, "c", "a"]
    reqs = [_req(PROMPTS[i % 5], key=k, max_new_tokens=3 + i) for i, k in enumerate(keys)]
    for r in reqs:
        gen.submit(r)
    stats = _run(gen)
    assert max(s.num_running for s in stats) == 2
    assert max(s.batch_size for s in stats) <= 2
    assert [k for group in prefill_keys for k in group] == keys  # admitted strictly in arrival order
    assert sum(s.admitted for s in stats) == len(reqs) and sum(s.finished for s in stats) == len(reqs)


def test_prefill_token_budget(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, max_tokens_per_step=8)
    long = _req(list(range(3, 23)), max_new_tokens=2)  # 20 tokens > budget: admitted alone
    short = [_req([5, 6, 7], max_new_tokens=2) for _ in range(3)]
    for r in [long, *short]:
        gen.submit(r)
    first = gen.step()
    assert first.admitted == 1 and first.prefill_tokens == 20
    second = gen.step()
    assert second.admitted == 2 and second.prefill_tokens == 6  # 3 rows x 3 tokens > 8
    _run(gen)
    assert all(_events(r)[1].finish_reason == "length" for r in [long, *short])


def test_cancel_stops_within_one_step(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, eos=[])
    keep, victim, queued = (_req(PROMPTS[i], max_new_tokens=50) for i in range(3))
    gen.submit(keep)
    gen.submit(victim)
    for _ in range(3):
        gen.step()
    gen.submit(queued)
    victim.cancel()
    queued.cancel()
    stats = gen.step()
    assert stats.decode_tokens == 1 and stats.admitted == 0 and stats.finished == 2
    assert gen.num_running == 1 and gen.num_waiting == 0
    tokens, fin = _events(victim)
    assert fin.finish_reason == "cancelled" and fin.completion_tokens == len(tokens) == 3
    assert _events(queued)[1].finish_reason == "cancelled"
    keep.cancel()
    gen.step()
    assert gen.num_running == 0 and _events(keep)[1].finish_reason == "cancelled"


def test_forward_errors_fail_the_batch_and_the_engine_goes_on(model, tokenizer) -> None:
    base = hf_forward(model)
    fail = {"on": True}

    def forward(*args):
        if fail["on"]:
            raise RuntimeError("boom")
        return base(*args)

    gen, bad = Generator(forward, tokenizer, []), _req(PROMPTS[0])
    gen.submit(bad)
    _run(gen)
    assert _events(bad)[1].finish_reason == "error" and "boom" in (_events(bad)[1].error or "")
    fail["on"] = False
    good = _req(PROMPTS[0], max_new_tokens=4)
    gen.submit(good)
    _run(gen)
    assert _tokens(good) == _reference(model, PROMPTS[0], 4, eos=None)


def test_run_forever_with_async_streams(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, eos=[], idle_wait_s=5.0)
    stop = threading.Event()
    thread = threading.Thread(target=gen.run_forever, args=(stop,), daemon=True)
    thread.start()

    async def client(prompt: list[int], n: int) -> tuple[list[int], FinishEvent]:
        req = GenerationRequest(
            prompt_token_ids=prompt, params=SamplingParams(max_new_tokens=n), sink=AsyncStream()
        )
        gen.submit(req)
        tokens: list[int] = []
        async for event in req.sink:  # type: ignore[attr-defined]
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
            else:
                return tokens, event
        raise AssertionError("stream ended without a FinishEvent")

    cases = [(PROMPTS[0], 5), (PROMPTS[2], 9), (PROMPTS[3], 3)]

    async def main() -> list[tuple[list[int], FinishEvent]]:
        return await asyncio.gather(*(client(p, n) for p, n in cases))

    try:
        results = asyncio.run(asyncio.wait_for(main(), timeout=60))
    finally:
        stop.set()
        gen.wake()
        thread.join(timeout=10)
    assert not thread.is_alive()
    for (tokens, fin), (p, n) in zip(results, cases, strict=True):
        assert tokens == _reference(model, p, n, eos=None) and fin.finish_reason == "length"


# ------------------------------------------------------------------------------------ text


class ScriptedForward:
    """A fake model: the row with adapter key ``k`` emits ``scripts[k]`` and then EOS.

    It writes one dummy KV column per input token so the batch bookkeeping is exercised for real.
    """

    def __init__(self, scripts: dict[Hashable, list[int]], prompt_len: int, vocab: int = 259) -> None:
        self.scripts, self.prompt_len, self.vocab = scripts, prompt_len, vocab

    def __call__(self, input_ids, attention_mask, position_ids, cache: DynamicCache, keys) -> torch.Tensor:
        b, t = input_ids.shape
        kv = torch.zeros(b, 1, t, 2)
        cache.update(kv, kv, 0)
        logits = torch.zeros(b, t, self.vocab)
        for row, key in enumerate(keys):
            step = int(attention_mask[row].sum()) - self.prompt_len  # tokens generated so far
            script = self.scripts[key]
            logits[row, -1, script[step] if step < len(script) else EOS] = 1.0
        return logits


def _scripted(tokenizer, texts: dict[Hashable, str]) -> Generator:
    scripts = {k: tokenizer.encode(v, add_special_tokens=False) for k, v in texts.items()}
    return Generator(ScriptedForward(scripts, prompt_len=2), tokenizer, [EOS])


def test_stop_strings_cut_text_and_deltas_never_leak(tokenizer) -> None:
    cases = {  # key: (script text, stop strings, expected final text, expected finish reason)
        "stop": ("héllo ST STOP world", ["STOP"], "héllo ST ", "stop"),
        "two": ("abc END xyz STOP", ["STOP", " END"], "abc", "stop"),
        "held": ("tail ST", ["STOP"], "tail ST", "length"),  # held-back stop prefix released at the end
        "none": ("naïve café 🙂 ok", [], "naïve café 🙂 ok", "eos"),
    }
    gen = _scripted(tokenizer, {k: c[0] for k, c in cases.items()})
    reqs = {}
    for key, (text, stop, _, _) in cases.items():
        n = len(text.encode()) if key == "held" else 100
        reqs[key] = _req([1, 1], key, max_new_tokens=n, stop=stop)
        gen.submit(reqs[key])
    _run(gen)
    all_deltas = {}
    for key, req in reqs.items():
        tokens, fin = _events(req)
        deltas = all_deltas[key] = [e.text_delta for e in tokens]
        assert (fin.text, fin.finish_reason) == cases[key][2:]
        assert "".join(deltas) == fin.text
        assert not any("\ufffd" in d for d in deltas)
        assert fin.completion_tokens == len(tokens)
    # "S", "T" were held back (a prefix of "STOP") until the next byte ruled the stop string out
    assert "ST " in all_deltas["stop"]


def test_max_seq_len(model, tokenizer) -> None:
    gen = _gen(model, tokenizer, max_seq_len=8)
    too_long, capped = _req(list(range(3, 11))), _req([5, 6, 7], max_new_tokens=50)
    gen.submit(too_long)
    gen.submit(capped)
    _run(gen)
    assert _events(too_long)[1].finish_reason == "error" and gen.num_waiting == 0
    assert _events(capped)[1].finish_reason == "length" and len(_tokens(capped)) == 5
