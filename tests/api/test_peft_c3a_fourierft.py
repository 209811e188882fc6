"""C3A and FourierFT folders built and saved by PEFT itself upload unchanged over HTTP and serve what
PEFT's ``generate`` computes (greedy tokens, chosen tokens' log-probabilities within float32
tolerance), alone and together in one batch; the stored files download byte for byte; features
not honoured are refused naming the field."""

from __future__ import annotations

import asyncio

import pytest
import torch

from .test_peft_types import (
    _assert_matches,
    _peft_greedy,
    _served,
    _upload_folder,
    assert_refused,
    build_saved,
)
from .tiny_server import TARGETS

pytestmark = pytest.mark.asyncio

KINDS = ["c3a", "c3a-pattern", "fourierft", "fourierft-pattern"]


def _peft_config(kind: str):
    """Tiny Llama sides are 16, 32 and 64: every block size below divides them all."""
    import peft

    if kind == "c3a":
        return peft.C3AConfig(block_size=8, target_modules=TARGETS)
    if kind == "c3a-pattern":  # PEFT's per-module block sizes, honoured
        return peft.C3AConfig(
            block_size=16,
            block_size_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            target_modules=TARGETS,
        )
    if kind == "fourierft":
        return peft.FourierFTConfig(
            n_frequency=40, scaling=150.0, random_loc_seed=123, target_modules=TARGETS
        )
    if kind == "fourierft-pattern":  # PEFT's per-module n, honoured
        return peft.FourierFTConfig(
            n_frequency=30,
            scaling=-90.0,
            n_frequency_pattern={"k_proj": 12, "layers.1.mlp.up_proj": 100},
            target_modules=TARGETS,
        )
    raise AssertionError(kind)


@torch.no_grad()
def _randomise(model, kind: str, seed: int) -> None:
    """Random non-zero adapter tensors with ΔW at about the scale of the tiny model's weights
    (std 0.02): C3A's ΔW is kernel / in (in = 32 or 64); FourierFT's RMS is about
    |scaling|·√(n/2)·std(c) / (out·in)."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    for name, p in model.named_parameters():
        if "c3a_kernel" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif "fourierft_spectrum" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            continue
        touched += 1
    assert touched == 2 * len(TARGETS)  # every projection of both layers


def _build(kind: str, folder, seed: int = 0):
    return build_saved(_peft_config(kind), _randomise, kind, folder, seed)


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
    weights = await client.get(f"/adapters/{kind}/files/adapter_model.safetensors")
    assert weights.content == (tmp_path / kind / "adapter_model.safetensors").read_bytes()


async def test_c3a_and_fourierft_in_one_batch(client, tmp_path):
    expected = {}
    for i, kind in enumerate(KINDS):
        model = _build(kind, tmp_path / kind, seed=10 + i)
        expected[kind] = _peft_greedy(model)
        await _upload_folder(client, f"mix-{kind}", tmp_path / kind)
    ids = [f"mix-{k}" for k in KINDS] * 2
    served = await asyncio.gather(*(_served(client, a) for a in ids))
    for adapter_id, got in zip(ids, served, strict=True):
        _assert_matches(got, expected[adapter_id.removeprefix("mix-")], adapter_id)


@pytest.mark.parametrize(
    ("kind", "edit", "field"),
    [
        ("c3a", {"bias": "c3a_only"}, "bias"),
        ("c3a", {"layers_to_transform": [0]}, "layers_to_transform"),
        ("fourierft", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("fourierft", {"exclude_modules": ["q_proj"]}, "exclude_modules"),
    ],
)
async def test_peft_features_not_honoured_are_422_naming_the_field(client, tmp_path, kind, edit, field):
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
