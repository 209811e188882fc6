"""OFT and BOFT folders, built and saved by PEFT itself on the tiny Llama with random non-zero
weights on all seven projections, upload unchanged over HTTP and serve what PEFT's ``generate``
computes: the same greedy tokens, log-probabilities within float32 tolerance, alone and together
in one batch; the stored files download byte for byte.

BOFT's butterfly factors need PEFT's CUDA extension (without it PEFT silently keeps one factor):
``tests.peft_butterfly.butterfly_peft`` stands in for it with the block diagonal it computes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.peft_butterfly import butterfly_peft

from .conftest import upload
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


def _peft_config(kind: str):
    import peft

    if kind == "oft":  # PEFT's defaults: Cayley–Neumann, 5 terms
        return peft.OFTConfig(oft_block_size=8, r=0, target_modules=TARGETS)
    if kind == "oft-cayley":  # exact Cayley, r blocks (8 and 16 wide), one block shared
        return peft.OFTConfig(
            r=4, oft_block_size=0, use_cayley_neumann=False, block_share=True, target_modules=TARGETS
        )
    if kind == "oft-coft":  # constrained: blocks clipped to norm eps / √4 (q..up) and eps / √8 (down)
        return peft.OFTConfig(oft_block_size=8, r=0, coft=True, eps=3.0, target_modules=TARGETS)
    if kind == "oft-wide":  # blocks as wide as k/v's output: served merged (serving_cost "gemm")
        return peft.OFTConfig(oft_block_size=16, r=0, use_cayley_neumann=False, target_modules=TARGETS)
    if kind == "boft":  # two butterfly factors of 4 x 4 blocks
        return peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS)
    if kind == "boft-num":  # four blocks per factor, three factors (k/v: "gemm", so served merged)
        return peft.BOFTConfig(
            boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3, target_modules=TARGETS
        )
    raise AssertionError(kind)


@torch.no_grad()
def _randomise(model, kind: str, seed: int) -> None:
    """Random non-zero values for every adapter tensor (PEFT's inits are the identity)."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "oft_R" in name or "boft_R" in name:  # skew generators; their rotations move the scores
            p.copy_(0.3 * noise)
        elif "boft_s" in name:  # output scales around 1
            p.copy_(1.0 + 0.3 * noise)
        else:
            continue
        touched += 1
    per_module = 2 if kind.startswith("boft") else 1
    assert touched == 2 * len(TARGETS) * per_module  # every projection of both layers


KINDS = ["oft", "oft-cayley", "oft-coft", "oft-wide", "boft", "boft-num"]


def _build(kind: str, folder, seed: int = 0):
    return build_saved(_peft_config(kind), _randomise, kind, folder, seed)


@pytest.mark.parametrize("kind", KINDS)
async def test_peft_folder_uploads_unchanged_and_serves_as_peft(client, tmp_path, kind):
    with butterfly_peft():
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


async def test_oft_and_boft_rows_in_one_batch(client, tmp_path):
    """Rows of every kind here (two OFT tables of one signature among them) share the forward passes."""
    expected = {}
    with butterfly_peft():
        for i, kind in enumerate(KINDS):
            model = _build(kind, tmp_path / kind, seed=10 + i)
            expected[kind] = _peft_greedy(model)
    for kind in KINDS:
        await _upload_folder(client, f"mix-{kind}", tmp_path / kind)
    ids = [f"mix-{k}" for k in KINDS] * 2
    served = await asyncio.gather(*(_served(client, a) for a in ids))
    for adapter_id, got in zip(ids, served, strict=True):
        _assert_matches(got, expected[adapter_id.removeprefix("mix-")], adapter_id)


@pytest.mark.parametrize(
    ("kind", "edit", "field"),
    [
        ("oft", {"peft_version": "0.17.1"}, "peft_version"),  # the older Cayley–Neumann series
        ("oft", {"bias": "oft_only"}, "bias"),
        ("oft-cayley", {"layers_to_transform": [0]}, "layers_to_transform"),
        ("boft", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("boft-num", {"exclude_modules": ["q_proj"]}, "exclude_modules"),
    ],
)
async def test_peft_features_not_honoured_are_422_naming_the_field(client, tmp_path, kind, edit, field):
    """Saved by PEFT, the field edited in its config as an older PEFT or another option writes it."""
    import json

    with butterfly_peft():
        _build(kind, tmp_path / kind)
    raw = json.loads((tmp_path / kind / "adapter_config.json").read_text())
    raw.update(edit)
    weights = (tmp_path / kind / "adapter_model.safetensors").read_bytes()
    await assert_refused(client, json.dumps(raw).encode(), weights, field)


async def test_boft_saved_without_peft_s_extension_is_422_naming_the_tensor(client, tmp_path, monkeypatch):
    """PEFT without its CUDA extension saves one factor for a two-factor config (and computes one
    there, two elsewhere): refused by the tensor's shape, not served as either."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)  # as where the build fails
    folder = tmp_path / "boft"
    _build("boft", folder)
    response = await upload(
        client,
        "one-factor",
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["where"].endswith(".boft_R"), response.text
    assert (
        error["message"].startswith("shape [1, ") and "expected [2, " in error["message"]
    )  # one factor kept
