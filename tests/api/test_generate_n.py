"""``n`` on ``POST /generate``: independent samples of one prompt, queued together (the prompt is
prefilled once), each equal to the single request with ``seed + j``."""

from __future__ import annotations

import pytest

from .conftest import adapter_files, sse_json, upload

pytestmark = pytest.mark.asyncio

SAMPLED = {"prompt": "t3 t1 t4 t1", "max_new_tokens": 10, "temperature": 1.0, "seed": 41, "logprobs": True}


async def _post(client, **body) -> dict:
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_each_sample_equals_the_single_request_with_seed_plus_j(client):
    out = await _post(client, **SAMPLED, n=3)
    singles = [await _post(client, **{**SAMPLED, "seed": SAMPLED["seed"] + j}) for j in range(3)]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for choice, single in zip(out["choices"], singles, strict=True):
        assert choice["text"] == single["text"] and choice["finish_reason"] == single["finish_reason"]
        assert [t["token_id"] for t in choice["logprobs"]] == [t["token_id"] for t in single["logprobs"]]
        assert choice["completion_tokens"] == single["usage"]["completion_tokens"]
    assert len({c["text"] for c in out["choices"]}) > 1  # the seeds really differ
    first = out["choices"][0]
    assert (out["text"], out["finish_reason"], out["logprobs"]) == (
        first["text"],
        first["finish_reason"],
        first["logprobs"],
    )
    # The prompt counts once; every sample's tokens count.
    assert out["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == sum(c["completion_tokens"] for c in out["choices"])


async def test_one_sample_keeps_the_single_shape_with_one_choice(client):
    out = await _post(client, prompt="t1 t2", max_new_tokens=4)
    assert [c["text"] for c in out["choices"]] == [out["text"]]
    assert out["choices"][0]["completion_tokens"] == out["usage"]["completion_tokens"] == 4


async def test_greedy_samples_with_an_adapter_are_equal_and_prompt_scores_come_once(client, tmp_path):
    config, weights = adapter_files(client.app, "lora", tmp_path / "a", seed=5)
    assert (await upload(client, "a", config, weights)).status_code == 201
    body = {"prompt": "t5 t6 t7", "max_new_tokens": 6, "adapter": "a", "prompt_logprobs": 2}
    one = await _post(client, **body)
    out = await _post(client, **body, n=2)
    assert [c["text"] for c in out["choices"]] == [one["text"]] * 2
    assert out["adapter"] == "a" and out["adapter_version"] == one["adapter_version"]
    got = [(p["token_id"], p["logprob"]) for p in out["prompt_logprobs"]]
    want = [(p["token_id"], p["logprob"]) for p in one["prompt_logprobs"]]
    assert got == want


async def test_streamed_samples_are_tagged_and_concatenate_to_their_choices(client):
    response = await client.post("/generate", json={**SAMPLED, "n": 2, "stream": True})
    assert response.status_code == 200
    events = sse_json(response.text)
    assert events[-1][0] == "done"
    done = events[-1][1]
    texts = {0: "", 1: ""}
    for name, data in events[:-1]:
        assert name == "token"
        texts[data["index"]] += data["text"]
    assert [texts[0], texts[1]] == [c["text"] for c in done["choices"]]
    plain = await client.post("/generate", json={**SAMPLED, "stream": True})
    assert all("index" not in d for n, d in sse_json(plain.text) if n == "token")  # n = 1: as before


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"n": 0}, "body.n"),
        ({"n": 17}, "body.n"),
        ({"n": "2"}, "body.n"),
        ({"n": 3, "seed": 2**63 - 2}, "body.seed"),
    ],
)
async def test_bad_n_is_422_naming_the_field(client, body, where):
    response = await client.post("/generate", json={"prompt": "t1", **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["where"] == where


async def test_samples_are_admitted_all_or_none(make_app):
    """A key that may hold 2 generations asking for 3 gets a 429 and leaves nothing queued."""
    from .conftest import serve

    app = make_app(api_keys=["infer:k"], key_max_concurrent=2)
    async with serve(app, headers={"Authorization": "Bearer k"}) as client:
        response = await client.post("/generate", json={"prompt": "t1", "n": 3, "max_new_tokens": 2})
        assert response.status_code == 429, response.text
        generator = app.state.runtime.engine.generator
        assert generator.num_queued == 0 and generator.num_running == 0
        assert (
            await client.post("/generate", json={"prompt": "t1", "n": 2, "max_new_tokens": 2})
        ).status_code == 200
