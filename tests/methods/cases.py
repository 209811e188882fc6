"""The one table of (family, config) cases every contract test runs over.

Shapes mimic a transformer layer at toy size: square attention, GQA k/v (out < in), MLP up
(out > in) and down (in > out). Every config must be valid on every shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES: dict[str, tuple[int, int]] = {
    "q_proj": (24, 24),
    "k_proj": (8, 24),
    "up_proj": (48, 24),
    "down_proj": (24, 48),
}
MODULE_SHAPES = {f"model.layers.0.{'self_attn' if n[0] in 'qk' else 'mlp'}.{n}": s for n, s in SHAPES.items()}
TARGETS = list(SHAPES)


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    config: dict
    identity: bool = True  # False: asking for an identity init is an error (plain ETHER, HRA odd r or GS)
    trains: bool = True  # False: uploaded only, no "train" init (VeRA)
    # False: the files hold adapter-wide tensors (VeRA's projections), so per-module params alone
    # do not make a folder; their round trip is tested with the type (tests/methods/test_peft_types.py)
    own_files: bool = True

    def raw_config(self) -> dict:
        peft_type = self.family.upper()
        return {"peft_type": peft_type, "target_modules": TARGETS, **self.config}


CASES = [
    Case("lora-r4", "lora", {"r": 4, "lora_alpha": 8}),
    Case("lora-r4-rslora", "lora", {"r": 4, "lora_alpha": 8, "use_rslora": True}),
    Case("hut-r1", "hut", {"r": 1}),
    Case("hut-r1-scale-shift", "hut", {"r": 1, "use_scale_shift": True}),
    Case("hut-r3", "hut", {"r": 3}),
    Case("hut-r3-scale-shift", "hut", {"r": 3, "use_scale_shift": True}),
    Case("ether-in-1", "ether", {"variant": "ether", "side": "in", "n_blocks": 1}),
    Case("ether-out-4", "ether", {"variant": "ether", "side": "out", "n_blocks": 4}),
    Case("ether-auto-2", "ether", {"variant": "ether", "side": "auto", "n_blocks": 2}),
    Case("etherplus-in-4", "ether", {"variant": "etherplus", "side": "in", "n_blocks": 4}),
    Case("etherplus-out-1", "ether", {"variant": "etherplus", "side": "out", "n_blocks": 1}),
    Case("etherplus-both-4", "ether", {"variant": "etherplus", "side": "both", "n_blocks": 4}),
    Case("dct-n20", "dct", {"n_frequency": 20, "scaling": 2.0}),
    Case("surm-circulant", "surm", {"variant": "circulant", "alpha": 1.5}),
    Case("surm-toeplitz", "surm", {"variant": "toeplitz", "alpha": 0.5}),
    Case("surm-kronecker-4", "surm", {"variant": "kronecker", "kron_factor": 4, "alpha": 1.0}),
    # PEFT types served through a family's math (ia3/hira: HUT; dora: LoRA plus a row scale)
    Case("ia3-out", "ia3", {}),  # output side everywhere; the input side: test_peft_types.py
    Case("hira-r2", "hira", {"r": 2}),
    Case("dora-r4", "dora", {"peft_type": "LORA", "use_dora": True, "r": 4, "lora_alpha": 8}),
    Case("loha-r3", "loha", {"r": 3, "alpha": 5}),
    Case("lokr-r1", "lokr", {"r": 1, "alpha": 3}),  # W2 a rank-1 product
    Case("lokr-full-f4", "lokr", {"r": 8, "decompose_factor": 4}),  # both whole
    Case("lokr-both-r2", "lokr", {"r": 2, "decompose_both": True, "decompose_factor": 8}),
    Case("hra-r1", "hra", {"r": 1}, identity=False),
    Case("hra-r4", "hra", {"r": 4}),
    Case("hra-r3-gs", "hra", {"r": 3, "apply_GS": True}, identity=False),
    Case("vera-r4", "vera", {"r": 4}, trains=False, own_files=False),
]
CASE_IDS = [c.id for c in CASES]


@torch.no_grad()
def merge_into(linear: torch.nn.Linear, method, cfg, params: dict) -> None:
    """Write the adapter's merged ``W'`` (and ``b'``) into ``linear`` in place: the reference model
    of a test is the base model with the adapter merged, computed in float32 like the server."""
    w = linear.weight
    p32 = {k: (v.float() if v.is_floating_point() else v) for k, v in params.items()}
    b32 = None if linear.bias is None else linear.bias.float()
    new_w, new_b = method.merged_weight(cfg, p32, w.float(), b32)
    w.copy_(new_w.to(w.dtype))
    if new_b is not None:
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(new_b.to(w.dtype), requires_grad=False)
        else:
            linear.bias.copy_(new_b.to(w.dtype))


def _gather_case_files() -> None:
    """Families added later list their cases in their own ``cases_<family>.py`` beside this file
    (a module-level ``CASES`` list), so adding a family touches no shared test file."""
    import importlib
    import pkgutil
    from pathlib import Path

    for mod in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
        if mod.startswith("cases_"):
            CASES.extend(importlib.import_module(f"{__package__}.{mod}").CASES)
    CASE_IDS[:] = [c.id for c in CASES]


_gather_case_files()
