"""PEFT folders of every supported type, built and saved by PEFT itself, upload unchanged over HTTP
and serve what PEFT computes: the same greedy tokens and the chosen tokens' log-probabilities
within float32 tolerance, alone and with every type in one batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from .conftest import upload
from .tiny_server import TARGETS

pytestmark = pytest.mark.asyncio

PROMPT_IDS = [3, 1, 4, 1, 5]
PROMPT = {"prompt": "t3 t1 t4 t1 t5", "max_new_tokens": 8, "logprobs": True}
# Worst-case rounding of a log-probability: eps per term of every reduction on its path. Per layer
# q/k/v/o and gate/up (length 32 each), attention (<= 13 positions, head dim 8) and down (64):
# about 310; two layers, the head (32) and the 128-way log-softmax: about 780 terms of magnitude
# <= 1 (RMS-normalised activations, logits below 1 on this model). Measured: 0 to 5e-7.
REDUCTION_TERMS = 2 * 310 + 32 + 128
LOGPROB_TOL = REDUCTION_TERMS * torch.finfo(torch.float32).eps


def _peft_config(kind: str):
    import peft

    if kind == "ia3":
        return peft.IA3Config(target_modules=TARGETS, feedforward_modules=["up_proj", "down_proj"])
    if kind == "hira":
        return peft.HiraConfig(r=2, target_modules=TARGETS)
    if kind == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    if kind == "lora-layers":  # PEFT's layer selection, honoured
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[1])
    if kind == "lora-patterns":  # PEFT's per-module ranks and alphas, honoured (with rsLoRA scaling)
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=TARGETS,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"k_proj": 3, "up_proj": 20},
        )
    if kind == "loha":
        return peft.LoHaConfig(r=3, alpha=6, target_modules=TARGETS)
    if kind == "lokr":
        return peft.LoKrConfig(r=2, alpha=4, target_modules=TARGETS)
    if kind == "lokr-both":
        return peft.LoKrConfig(r=2, alpha=3, decompose_both=True, decompose_factor=8, target_modules=TARGETS)
    if kind == "hra":
        return peft.HRAConfig(r=4, target_modules=TARGETS)
    if kind == "hra-gs":
        return peft.HRAConfig(r=3, apply_GS=True, target_modules=TARGETS)
    if kind == "vera":
        return peft.VeraConfig(r=4, target_modules=TARGETS, save_projection=True, projection_prng_key=7)
    if kind == "c3a":
        return peft.C3AConfig(block_size=8, target_modules=TARGETS)
    if kind == "fourierft":
        return peft.FourierFTConfig(
            n_frequency=40, scaling=150.0, random_loc_seed=123, target_modules=TARGETS
        )
    if kind == "oft":  # PEFT's defaults: Cayley-Neumann, 5 terms
        return peft.OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS)
    if kind == "boft":
        return peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS)
    raise AssertionError(kind)


@torch.no_grad()
def _randomise(model, kind: str, seed: int) -> None:
    """Random non-zero values for every adapter tensor (PEFT's inits are the identity)."""
    g = torch.Generator().manual_seed(seed)
    names = {
        "ia3": ("ia3_l",),
        "hira": ("hira_A", "hira_B"),
        "dora": ("lora_A", "lora_B", "lora_magnitude"),
        "vera": ("vera_lambda_b", "vera_lambda_d"),  # vera_A/vera_B: PEFT's random buffers
        "hra": ("hra_u",),
        "hra-gs": ("hra_u",),
        "lora-layers": ("lora_A", "lora_B"),
        "lora-patterns": ("lora_A", "lora_B"),
        "loha": ("hada_",),
        "lokr": ("lokr_",),
        "lokr-both": ("lokr_",),
        "c3a": ("c3a_kernel",),
        "fourierft": ("fourierft_spectrum",),
        "oft": ("oft_R",),
        "boft": ("boft_R", "boft_s"),
    }
    touched = 0
    for name, p in model.named_parameters():
        if not any(n in name for n in names[kind]):
            continue
        noise = torch.randn(p.shape, generator=g)
        if "magnitude" in name:  # DoRA's m: PEFT's init ‖W‖ (after the factors), rescaled
            p.mul_(1.0 + 0.3 * noise)
        elif kind == "ia3":  # scales around 1, strong enough to move the tiny model's scores
            p.copy_(1.0 + noise)
        elif kind == "hira":  # mask 1 + BA with BA of std about 1.4
            p.copy_(noise)
        elif "lambda_d" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif "lambda_b" in name:  # PEFT's init is 0; the projections are Kaiming-uniform
            p.copy_(3.0 * noise)
        elif kind == "c3a":  # dW = kernel / in (32 or 64): std 1 puts dW at the weights' scale
            p.copy_(noise)
        elif kind == "fourierft":  # dW RMS ~ scaling * sqrt(n/2) * std(c) / (out * in)
            p.copy_(0.05 * noise)
        elif "boft_s" in name:  # output scales around 1
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(0.3 * noise)
        touched += 1
    assert touched >= (1 if kind == "lora-layers" else 2) * len(TARGETS)  # every projection (of each layer)


def build_saved(config, randomise, kind: str, folder, seed: int = 0):
    """A PEFT model of ``config`` on the tiny Llama the server holds (same seed: same weights), its
    adapter tensors set by ``randomise(model, kind, seed)``, saved to ``folder``."""
    from peft import get_peft_model

    from tests.conftest import make_tiny_llama

    model = get_peft_model(make_tiny_llama(), config)
    randomise(model, kind, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


def _build(kind: str, folder, seed: int = 0):
    return build_saved(_peft_config(kind), _randomise, kind, folder, seed)


async def assert_refused(client, config_bytes: bytes, weights_bytes: bytes, field: str) -> None:
    """The upload is a 422 naming ``field`` and nothing is stored."""
    response = await upload(client, "refused", config_bytes, weights_bytes)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["where"] == field, response.text
    assert (await client.get("/adapters/refused")).status_code == 404


def _peft_greedy(model) -> tuple[list[int], list[float]]:
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=PROMPT["max_new_tokens"],
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(PROMPT_IDS) :].tolist()
    logprobs = [
        torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)
    ]
    return tokens, logprobs


async def _upload_folder(client, adapter_id: str, folder) -> dict:
    response = await upload(
        client,
        adapter_id,
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
    )
    assert response.status_code == 201, response.text
    return response.json()


async def _served(client, adapter_id: str) -> tuple[list[int], list[float]]:
    response = await client.post("/generate", json={**PROMPT, "adapter": adapter_id})
    assert response.status_code == 200, response.text
    lps = response.json()["logprobs"]
    return [t["token_id"] for t in lps], [t["logprob"] for t in lps]


def _assert_matches(served, expected, what: str) -> None:
    (tokens, lps), (want_tokens, want_lps) = served, expected
    assert tokens == want_tokens, what
    for got, want in zip(lps, want_lps, strict=True):
        assert abs(got - want) <= LOGPROB_TOL, (what, got, want)


KINDS = [
    "ia3",
    "hira",
    "dora",
    "vera",
    "hra",
    "hra-gs",
    "lora-layers",
    "lora-patterns",
    "loha",
    "lokr",
    "lokr-both",
]


@pytest.mark.parametrize("kind", KINDS)
async def test_peft_folder_uploads_unchanged_and_serves_as_peft(client, tmp_path, kind):
    model = _build(kind, tmp_path / kind)
    expected = _peft_greedy(model)
    with model.disable_adapter():
        base_expected = _peft_greedy(model)
    info = await _upload_folder(client, kind, tmp_path / kind)
    assert info["family"] == kind.split("-")[0]
    assert expected[0] != base_expected[0]  # the adapter changes what the model says
    _assert_matches(await _served(client, kind), expected, kind)
    # The stored files are PEFT's own: downloading gives back the uploaded weights byte for byte.
    weights = await client.get(f"/adapters/{kind}/files/adapter_model.safetensors")
    assert weights.content == (tmp_path / kind / "adapter_model.safetensors").read_bytes()


# Types with their own HTTP tests (tests/api/test_peft_oft.py, test_peft_c3a_fourierft.py), in the
# one-batch test here with all the others.
MIXED_KINDS = [*KINDS, "c3a", "fourierft", "oft", "boft"]


async def test_every_peft_type_in_one_batch(client, tmp_path):
    """Rows of every type share the forward passes and each still gets PEFT's answer."""
    from tests.peft_butterfly import butterfly_peft

    expected = {}
    with butterfly_peft():  # BOFT as PEFT builds it with its CUDA extension (tests/peft_butterfly.py)
        for i, kind in enumerate(MIXED_KINDS):
            model = _build(kind, tmp_path / kind, seed=10 + i)
            expected[kind] = _peft_greedy(model)
            await _upload_folder(client, f"mix-{kind}", tmp_path / kind)
    ids = [f"mix-{k}" for k in MIXED_KINDS] * 2
    served = await asyncio.gather(*(_served(client, a) for a in ids))
    for adapter_id, got in zip(ids, served, strict=True):
        _assert_matches(got, expected[adapter_id.removeprefix("mix-")], adapter_id)


@pytest.mark.parametrize(
    ("kind", "edit", "field"),
    [
        ("vera", {"save_projection": False}, "save_projection"),
        ("dora", {"exclude_modules": ["q_proj"]}, "exclude_modules"),
        ("ia3", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("hira", {"layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
async def test_peft_features_not_honoured_are_422_naming_the_field(client, tmp_path, kind, edit, field):
    """Saved by PEFT with the feature on, uploaded: refused by name, nothing stored."""
    import peft

    from tests.conftest import make_tiny_llama

    config = _peft_config(kind)
    for k, v in edit.items():
        setattr(config, k, v)
    peft.get_peft_model(make_tiny_llama(), config).save_pretrained(tmp_path / kind)
    config_bytes = (tmp_path / kind / "adapter_config.json").read_bytes()
    await assert_refused(
        client, config_bytes, (tmp_path / kind / "adapter_model.safetensors").read_bytes(), field
    )
