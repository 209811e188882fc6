"""LoRA (compatibility family), loading folders written by PEFT's ``save_pretrained`` unchanged.

PyTorch layout: ``W [out, in]``, ``y = x Wᵀ + b``. With ``A = lora_A [r, in]`` and
``B = lora_B [out, r]``:

    W' = W + s · B A,      s = lora_alpha / r   (or lora_alpha / √r with use_rslora)
    Δy = s · (x Aᵀ) Bᵀ     (on the fly; the bias is untouched)

Files follow PEFT: tensors ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and
an ``adapter_config.json`` with every key PEFT 0.21 writes. Keys that would change the math
(DoRA, rank/alpha patterns, biases, modules_to_save, layer selection, weight-modifying inits,
...) are rejected by name; bookkeeping keys (dropout, task_type, peft_version, ...) are accepted
and ignored. ``auto_mapping`` (PEFT records the base model class there) is accepted as data
and never acted on: nothing in a config is imported.

Init: ``train``/``identity`` as PEFT (A Kaiming-uniform, i.e. U(±1/√in), B = 0); ``random``
draws B too, scaled so that ``s·BA`` is about 0.3× the scale of W.

Mixed batches: ``prepare`` folds ``s`` into ``Bᵀ [r, out]``. Two exact forms, chosen by the
table's shape (measured on CPU at SmolLM2 shapes, 64 rows): r <= 8 (and always on GPU): each row
gathers its factors, two batched mat-vecs (``R·r·(in+out)`` floats copied, no host sync); larger r
on CPU: rows regrouped per slot (padded to the largest group) and two ``bmm`` over the slot
factors in place (per-row gathers became 2-10x slower from r = 16). Both select each row's own
factors: no row's activations ever meet another slot's factors. (A dense form over every slot's
factors with a one-hot row mask was as fast at small tables, but ``0 · inf = NaN``: one slot's
overflow would reach every row of the batch.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, StrictBool, StrictInt, field_validator

from .base import (
    MAX_RANK,
    PEFT_FEATURES,
    AdapterMethod,
    FastOp,
    InitMode,
    MethodConfig,
    ParamSpec,
    Scale,
    StrictNumber,
    auto_mapping_shape,
    bias_none,
    matches_target,
    must_be_off,
    per_row,
    refuse,
)
from .registry import register_method

# Keys PEFT writes whose only accepted values are the "feature off" ones, and why.
_OFF: dict[str, str] = {
    "use_dora": "DoRA adds a magnitude vector and a column norm",
    **{k: PEFT_FEATURES[k] for k in ("modules_to_save", "fan_in_fan_out", "exclude_modules")},
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA pooling",
    "use_bdlora": "block-diagonal factors",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "adapting nn.Parameters",
    "alora_invocation_tokens": "activated LoRA (token-dependent)",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron parallel layers",
    "loftq_config": "LoftQ (modifies the base weights)",
    "corda_config": "CorDA (modifies the base weights)",
    "lora_ga_config": "LoRA-GA (modifies the base weights)",
    "kasa_config": "KaSA (truncates the base weights)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA (sampled factors)",
}
# init_lora_weights values whose saved factors apply to the untouched base weight.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica"}
GATHER_MAX_RANK = 8  # r up to which per-row gathered factors beat regrouping rows per slot (CPU)


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return pattern.get(module, default)


class LoraConfig(MethodConfig):
    r: StrictInt = Field(8, ge=1, le=MAX_RANK)
    lora_alpha: Scale = 8.0  # |alpha| <= MAX_SCALE
    use_rslora: StrictBool = False
    # Accepted, ignored (training-time or bookkeeping only).
    lora_dropout: StrictNumber = Field(0.0, ge=0.0, lt=1.0)
    init_lora_weights: StrictBool | str = True
    peft_version: str | None = None
    qalora_group_size: StrictInt = Field(16, ge=1)
    ensure_weight_tying: StrictBool = False
    eva_config: dict[str, Any] | None = None  # EVA only chooses the init; the factors are plain LoRA
    auto_mapping: dict[str, str] | None = None  # PEFT's base-class hint; never imported here
    bias: str = "none"
    megatron_core: str | None = "megatron.core"
    # Must be "off" (see _OFF).
    use_dora: Any = False
    # PEFT's per-module ranks and alphas, honoured exactly (``for_module``)
    rank_pattern: dict[str, Annotated[StrictInt, Field(ge=1, le=MAX_RANK)]] | None = Field(
        default_factory=dict
    )
    alpha_pattern: dict[str, Scale] | None = Field(default_factory=dict)
    modules_to_save: Any = None
    fan_in_fan_out: Any = False
    # PEFT's layer selection, honoured exactly (``targets``)
    layers_to_transform: StrictInt | list[StrictInt] | None = None
    layers_pattern: str | list[str] | None = None
    exclude_modules: Any = None
    lora_bias: Any = False
    use_qalora: Any = False
    use_bdlora: Any = None
    layer_replication: Any = None
    trainable_token_indices: Any = None
    target_parameters: Any = None
    alora_invocation_tokens: Any = None
    arrow_config: Any = None
    megatron_config: Any = None
    loftq_config: Any = Field(default_factory=dict)
    corda_config: Any = None
    lora_ga_config: Any = None
    kasa_config: Any = None
    velora_config: Any = None
    monteclora_config: Any = None

    _off = must_be_off(_OFF)
    _bias = bias_none()
    _auto_mapping = auto_mapping_shape()

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_with_list_targets(cls, v: int | list[int] | None, info) -> int | list[int] | None:
        if v is not None and isinstance(info.data.get("target_modules"), str):
            raise refuse("layers_to_transform needs target_modules as a list, not a regex (as PEFT)")
        if v is not None and any(i < 0 for i in ([v] if isinstance(v, int) else v)):
            raise refuse("layer indices must be >= 0")
        return v

    @field_validator("layers_pattern")
    @classmethod
    def _pattern_with_layers(cls, v: str | list[str] | None, info) -> str | list[str] | None:
        if v and info.data.get("layers_to_transform") is None:
            raise refuse("layers_pattern needs layers_to_transform (as PEFT)")
        if v and isinstance(info.data.get("target_modules"), str):
            raise refuse("layers_pattern needs target_modules as a list, not a regex (as PEFT)")
        for p in [v] if isinstance(v, str) else v or []:
            try:
                re.compile(p)
            except re.error as e:
                raise refuse(f"{p!r} is not a regular expression ({e})") from None
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys(cls, v: dict | None) -> dict | None:
        for key in v or {}:
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise refuse(f"{key!r} is not a regular expression ({e})") from None
        return v

    def for_module(self, module: str) -> LoraConfig:
        """PEFT's ``get_pattern_key``: the first pattern key matching the end of the module path
        (after a dot) gives its rank / alpha; otherwise ``r`` / ``lora_alpha``."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        r = _pattern_value(self.rank_pattern or {}, module, self.r)
        alpha = _pattern_value(self.alpha_pattern or {}, module, self.lora_alpha)
        if r == self.r and alpha == self.lora_alpha:
            return self  # no pattern changes this module
        return self.model_copy(update={"r": r, "lora_alpha": alpha, "rank_pattern": {}, "alpha_pattern": {}})

    def targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists``: a name listed in full is always adapted; a suffix
        match is adapted only in the selected layers (the first numbered path segment, or the one
        after ``layers_pattern``)."""
        tm = self.target_modules
        if isinstance(tm, str) or module in tm:
            return matches_target(module, tm)
        if not any(module.endswith("." + t) for t in tm):
            return False
        chosen = self.layers_to_transform
        if chosen is None or chosen == []:
            return True
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            found = None
            patterns = self.layers_pattern
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if found is not None:
                    break
        if found is None:
            return False
        idx = int(found.group("idx"))
        return idx == chosen if isinstance(chosen, int) else idx in chosen

    @field_validator("init_lora_weights")
    @classmethod
    def _plain_init(cls, v: bool | str) -> bool | str:
        if isinstance(v, str) and v.lower() not in _PLAIN_INITS:
            raise refuse(
                f"init_lora_weights={v!r} is not supported: it modifies the base weights; convert the "
                "adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first"
            )
        return v

    @field_validator("megatron_core")
    @classmethod
    def _megatron_core_default(cls, v: str | None) -> str | None:
        if v not in (None, "megatron.core"):
            raise refuse(f"megatron_core={v!r} is not supported (only the default 'megatron.core')")
        return v

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraMethod(AdapterMethod):
    name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    config_cls: ClassVar[type[MethodConfig]] = LoraConfig

    @classmethod
    def claims_peft(cls, raw: dict) -> bool:
        return raw.get("use_dora") is not True  # use_dora: true is DoRA's (dora.py)

    def param_specs(self, cfg: LoraConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        return {"lora_A": ParamSpec((cfg.r, in_f)), "lora_B": ParamSpec((out_f, cfg.r))}

    def tensor_suffix(self, pname: str) -> str:
        return f"{pname}.weight"  # PEFT: lora_A.weight / lora_B.weight (adapter name stripped)

    def init_params(
        self, cfg: LoraConfig, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        out_f, in_f = weight.shape
        dev = weight.device
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=√5), as PEFT and nn.Linear
        a = (torch.rand(cfg.r, in_f, generator=generator, device=dev) * 2 - 1) * bound
        if mode == "random":
            # (s·BA)_ij has std ≈ s·√r·σ_B·bound/√3; aim at 0.3 × std(W).
            w_std = weight.float().std().clamp_min(1e-3).item()
            sigma_b = 0.3 * w_std / (max(abs(cfg.scaling), 1e-3) * math.sqrt(cfg.r) * bound / math.sqrt(3))
            b = torch.randn(out_f, cfg.r, generator=generator, device=dev) * sigma_b
        else:
            b = torch.zeros(out_f, cfg.r, device=dev)
        return {"lora_A": a, "lora_B": b}

    def reference_weight(self, cfg: LoraConfig, params, weight, bias):
        a, b = params["lora_A"], params["lora_B"]
        delta = torch.zeros_like(weight)
        for k in range(cfg.r):  # ΔW = Σ_k B[:, k] ⊗ A[k, :]
            delta += torch.outer(b[:, k], a[k, :])
        return weight + cfg.scaling * delta, bias

    def merged_weight(self, cfg: LoraConfig, params, weight, bias):
        return torch.addmm(weight, params["lora_B"], params["lora_A"], alpha=cfg.scaling), bias

    # ---- serving -------------------------------------------------------------------------
    def signature(self, cfg: LoraConfig, out_f: int, in_f: int) -> Hashable:
        return ("lora", cfg.r)  # the scaling is folded into the slot tensors

    def prepare(self, cfg: LoraConfig, params, weight):
        return {
            "A": params["lora_A"].to(weight.dtype),  # [r, in]
            "Bt": (params["lora_B"].T * cfg.scaling).to(weight.dtype),  # [r, out], scaled
        }

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return frozenset({"delta"})

    def fast_op(self, kernels, sig: Hashable, hook: str, shared) -> FastOp | None:
        """``y += (x Aᵀ) Btᵀ`` per row, for every family whose tables are LoRA's ``A``/``Bt`` (DoRA
        inherits it for its delta; its output scale stays the torch ``post``)."""
        if hook != "delta":
            return None
        return lambda y, x, g: kernels.lora_add_(y, x, g.rows, g.slots, g.table["A"], g.table["Bt"])

    def native_op(self, kernels, sig: Hashable, hook: str, g, shared):
        return kernels.op_lora_add(g.rows, g.slots, g.table["A"], g.table["Bt"])

    def delta(self, sig, x, table, slots, weight):
        a, bt = table["A"], table["Bt"]  # [S, r, in], [S, r, out]
        if slots is None:  # training: one adapter on every row
            return (x @ a[0].T) @ bt[0]
        if x.is_cuda or a.shape[1] <= GATHER_MAX_RANK:
            return _gathered(x, a, bt, slots)
        return _segmented(x, a, bt, slots)


def _gathered(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row gathers its factors: two batched mat-vecs, no host sync (GPU)."""
    h = torch.bmm(x.unsqueeze(1), per_row(a, slots).transpose(1, 2))  # [R, 1, r]
    return torch.bmm(h, per_row(bt, slots)).view(x.shape[0], -1)  # [R, out]


def _segmented(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows regrouped per slot (padded to the largest group) and one bmm per factor (CPU).

    Moves only x and the output, never per-row copies of the factors; the group size is read
    on the host (a sync, so the GPU uses ``_gathered``).
    """
    n_slots, _, in_f = a.shape
    seen = (slots[:, None] == torch.arange(n_slots, device=slots.device)).cumsum(0)  # [R, S]
    m = int(seen[-1].max())  # largest group
    place = slots * m + seen.gather(1, slots[:, None]).view(-1) - 1  # row -> slot·m + rank in group
    xp = x.new_zeros(n_slots * m, in_f).index_copy_(0, place, x).view(n_slots, m, in_f)
    yp = torch.bmm(torch.bmm(xp, a.transpose(1, 2)), bt)  # [S, m, out]
    return yp.view(n_slots * m, -1).index_select(0, place)


register_method(LoraMethod())
