"""The interface every adapter family implements.

An adapter family ("method") is a stateless object registered by name. It knows, for one
``nn.Linear`` with weight ``W [out, in]`` and optional bias:

* its configuration (a pydantic model, parsed from ``adapter_config.json``) and the tensors
  an adapter stores for that linear (``param_specs``);
* how to initialise those tensors (``init_params``: identity, the paper's training init, or
  random non-zero values for tests and benchmarks);
* the slow, explicit dense reference ``W' = f(W, params)`` used as the test oracle
  (``reference_weight``) and the fast merge (``merged_weight``);
* the batched on-the-fly path. Adapters of one family whose configs give the same
  ``signature`` share a slot table: per-slot tensors produced by ``prepare`` and stacked along
  dim 0. For a group of token rows that use this family, each row naming its own slot, the
  family contributes up to three row-local steps around the one shared base GEMM
  (see ``server.methods.batched.batched_linear``):

      x_rows  <- pre(x_rows)                 input-side transforms (ETHER in, HUT b)
      y       =  x' @ W.T                    one GEMM shared by every row of the batch
      y_rows  <- post(y_rows)                output-side transforms (ETHER out, HUT a, γ)
      y_rows  += delta(x_rows)               additive updates (LoRA, DCT, SURM, HUT rank>1, β)

  ``slots`` is a LongTensor with one slot index per row, or ``None`` meaning every row uses
  entry 0 of a one-entry table (the training path: no gather, broadcasting instead).

Everything in ``prepare``/``pre``/``post``/``delta`` is differentiable, so training runs the
same code as serving (``server.methods.batched.adapted_forward``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

InitMode = Literal["identity", "train", "random"]
# A fused kernel doing one hook of one group in place: ``(target, x, group)``, where ``target`` is
# the tensor written (the pre-transformed input for ``pre``, the base output for ``post`` and
# ``delta``) and ``x`` the step's original input rows (server/kernels/fast.py).
FastOp = Callable[[torch.Tensor, torch.Tensor, Any], None]

# Scalar bounds shared by the families (docs/adapter-format.md lists each field's range).
# MAX_SCALE: |lora_alpha|, |SURM alpha|, |DCT scaling|. Published recipes stay below a few
# thousand (alpha = 2r with r <= 4096 is 8192); 2^16 leaves 8x room, and with tensor values
# |x| <= 1e4 (StoreLimits.max_abs_value) every prepared slot table stays below ~1e17: finite in
# float32 and bfloat16 (float16 servers check their tables at 65504, see ``check_tables``).
MAX_SCALE = 65536.0
MAX_RANK = 4096  # LoRA r: above every published recipe; the tensors' size caps apply as well

# JSON-strict scalars: an int is a number, but "8", true and NaN/Inf are not.
StrictNumber = Annotated[float, Strict(), AllowInfNan(False)]
Scale = Annotated[StrictNumber, Field(ge=-MAX_SCALE, le=MAX_SCALE)]


class AdapterError(ValueError):
    """A problem with an adapter's config or tensors. ``where`` names the field/tensor/limit."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}")


class ConfigError(AdapterError):
    pass


class WeightsError(AdapterError):
    pass


@dataclass(frozen=True)
class ParamSpec:
    """One stored tensor of an adapter for one linear layer."""

    shape: tuple[int, ...]
    trainable: bool = True
    # "float" tensors follow the model/adapter float dtype; "int32" ones are indices (DCT positions).
    kind: Literal["float", "int32"] = "float"
    # A view of an adapter-wide tensor (``shared_specs``: VeRA's projections), stored once for all
    # modules, not under this module's name.
    shared: bool = False


def matches_target(module_name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a string is a full regex match; a list matches the name or its last parts."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


class MethodConfig(BaseModel):
    """Fields common to every family; each family subclasses this with its own fields.

    Unknown fields are rejected (allowlist): nothing in a config can import code or point
    at files.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    peft_type: str
    target_modules: list[str] | str
    base_model_name_or_path: str | None = None
    # Harmless bookkeeping fields that PEFT (and we) write; accepted and ignored.
    task_type: str | None = None
    inference_mode: StrictBool = True
    revision: str | None = None
    format_version: StrictInt = 1

    def for_module(self, module: str) -> MethodConfig:
        """The config that applies to the linear at ``module`` (LoRA: PEFT's rank/alpha patterns)."""
        return self

    def targets(self, module: str) -> bool:
        """Whether this adapter adapts the linear at ``module`` (LoRA adds PEFT's layer selection)."""
        return matches_target(module, self.target_modules)

    def check_shape(self, module: str, out_f: int, in_f: int) -> None:
        """Raise ConfigError if this config cannot adapt a ``[out_f, in_f]`` linear."""


# ---- config helpers shared by the families' PEFT-format configs ---------------------------------
def refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as is (no "Value error, " prefix)."""
    return PydanticCustomError("unsupported", "{message}", {"message": message})


def must_be_off(reasons: dict[str, str]):
    """A config validator refusing, naming the field, any "feature on" value of ``reasons``' keys:
    PEFT features a type does not honour are refused, never silently ignored."""

    def check(cls, v: Any, info) -> Any:
        if v not in (None, False, {}, []):
            raise refuse(f"{info.field_name}={v!r} is not supported ({reasons[info.field_name]})")
        return v

    return field_validator(*reasons)(classmethod(check))


def bias_none():
    """A config validator: PEFT's ``bias`` must be "none" (trained biases are not served)."""

    def check(cls, v: str) -> str:
        if v != "none":
            raise refuse(f"bias={v!r} is not supported (trained biases); only 'none'")
        return v

    return field_validator("bias")(classmethod(check))


def auto_mapping_shape():
    """A config validator: PEFT's ``auto_mapping`` (the base model class it records) is data with
    exactly two string keys; it is never imported, and nothing else may ride along in it."""

    def check(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and set(v) != {"base_model_class", "parent_library"}:
            raise refuse(f"auto_mapping may only hold base_model_class and parent_library, got {sorted(v)}")
        return v

    return field_validator("auto_mapping")(classmethod(check))


# PEFT features that most types do not honour, and why (shown in the 422 that names the field).
PEFT_FEATURES = {
    "modules_to_save": "fully fine-tuned extra modules",
    "exclude_modules": "module exclusion",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "layers_to_transform": "layer selection beyond target_modules",
    "layers_pattern": "layer selection beyond target_modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
}


class PeftConfig(MethodConfig):
    """What PEFT-format configs of every type share (the types of ``server/methods`` that upload
    PEFT's folders): ``auto_mapping`` as data, ``bias`` only ``"none"``, and PEFT's features of
    ``PEFT_FEATURES``, each refused with a 422 naming it when switched on. A type that honours one
    redeclares the field and its own ``_features`` validator over the others; PEFT's bookkeeping
    ``peft_version`` stays with each type (OFT's layouts depend on it)."""

    auto_mapping: dict[str, str] | None = None  # PEFT's base-class hint; never imported here
    bias: str = "none"
    modules_to_save: Any = None
    exclude_modules: Any = None
    fan_in_fan_out: Any = False
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: Any = None
    alpha_pattern: Any = None

    _features = must_be_off(PEFT_FEATURES)
    _auto_mapping = auto_mapping_shape()
    _bias = bias_none()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype spectral families (FFTs, DCTs) compute in: float32, or float64 for float64 inputs
    (bfloat16 and float16 have no CPU FFT, and half precision would lose the spectra)."""
    return torch.promote_types(dtype, torch.float32)


def per_row(t: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """Per-row view of a stacked slot tensor ``t [S, ...]``.

    With ``slots`` given: ``t[slots]`` of shape ``[R, ...]``. With ``slots=None`` (one-entry
    table, every row uses it): ``t[:1]`` of shape ``[1, ...]``, which broadcasts over rows.
    """
    return t[:1] if slots is None else t.index_select(0, slots)


class AdapterMethod(ABC):
    """Base class of an adapter family. Subclasses are stateless; register one instance."""

    name: ClassVar[str]  # registry key, lower case: "lora", "hut", "ether", "dct", "surm"
    peft_type: ClassVar[str]  # value of ``peft_type`` in adapter_config.json
    config_cls: ClassVar[type[MethodConfig]]
    # True where ``prepare`` reads the base weight's values (DoRA's norms), not only its shape:
    # the store's upload check then cannot use a stand-in; the engine checks the real tables.
    prepare_reads_weight: ClassVar[bool] = False
    # True where the linear's bias enters the slot tables (IA3 scales the output and the bias):
    # ``prepare`` is then also given ``bias=`` (the engine passes the module's, None without one).
    prepare_uses_bias: ClassVar[bool] = False
    # AdamW's starting point when a fine-tune job names none (rough; compare with bench/finetune.py);
    # ``learning_rate_for`` may refine it per config.
    default_learning_rate: ClassVar[float] = 1e-3

    @classmethod
    def claims_peft(cls, raw: dict) -> bool:
        """Whether this family serves ``raw``, a config of its ``peft_type``. Several families may
        share a peft_type (LORA: plain LoRA and DoRA); each claims its own configs."""
        return True

    # ---- configuration -------------------------------------------------------------------
    def parse_config(self, raw: dict) -> MethodConfig:
        try:
            return self.config_cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(loc, err["msg"]) from None

    @abstractmethod
    def param_specs(self, cfg: MethodConfig, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        """Names and shapes of the tensors stored for one ``[out_f, in_f]`` linear."""

    def module_specs(self, cfg: MethodConfig, module: str, out_f: int, in_f: int) -> dict[str, ParamSpec]:
        """``param_specs`` for the linear at ``module``: overridden where the stored layout depends on
        the module's role (IA3: feedforward modules scale the input, the others the output)."""
        return self.param_specs(cfg, out_f, in_f)

    def trainable_count(self, cfg: MethodConfig, out_f: int, in_f: int) -> int:
        n = 0
        for spec in self.param_specs(cfg, out_f, in_f).values():
            if spec.trainable:
                size = 1
                for d in spec.shape:
                    size *= d
                n += size
        return n

    def learning_rate_for(self, cfg: MethodConfig) -> float:
        """AdamW's default learning rate for training ``cfg`` (``default_learning_rate`` unless a
        family's variants need different ones)."""
        return self.default_learning_rate

    def check_params(
        self, cfg: MethodConfig, module: str, params: dict[str, torch.Tensor], out_f: int, in_f: int
    ) -> None:
        """Value checks beyond shape and dtype (e.g. DCT positions in range and unique)."""
        return None

    def tensor_suffix(self, pname: str) -> str:
        """Name of a parameter inside the safetensors file, after the module path."""
        return pname

    # ---- initialisation ------------------------------------------------------------------
    @abstractmethod
    def init_params(
        self,
        cfg: MethodConfig,
        weight: torch.Tensor,
        mode: InitMode,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Fresh parameters for the linear whose (frozen) weight is ``weight [out, in]``.

        ``identity``: W' == W exactly (raise ConfigError where the family has none);
        ``train``: the paper's initialisation for training; ``random``: every tensor random and
        non-zero (tests, benchmarks). Float tensors are float32 on ``weight.device``.
        """

    def shared_specs(self, cfg: MethodConfig, targets: Mapping[str, tuple[int, int]]) -> dict[str, ParamSpec]:
        """Adapter-wide tensors by their full key in the safetensors file (none for most families)."""
        return {}

    def shared_views(
        self, cfg: MethodConfig, shared: Mapping[str, torch.Tensor], module: str, out_f: int, in_f: int
    ) -> dict[str, torch.Tensor]:
        """This module's views (its ``shared=True`` params) of the adapter-wide tensors."""
        return {}

    def init_module_params(
        self, cfg: MethodConfig, module: str, weight: torch.Tensor, mode: InitMode, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``init_params`` for the linear at ``module`` (see ``module_specs``)."""
        return self.init_params(cfg, weight, mode, generator)

    # ---- dense forms ---------------------------------------------------------------------
    @abstractmethod
    def reference_weight(
        self,
        cfg: MethodConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slow, obviously-correct ``(W', b')`` built with explicit dense matrices (test oracle)."""

    def merged_weight(
        self,
        cfg: MethodConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fast ``(W', b')`` for merging. Defaults to the reference."""
        return self.reference_weight(cfg, params, weight, bias)

    # ---- batched on-the-fly path ---------------------------------------------------------
    @abstractmethod
    def signature(self, cfg: MethodConfig, out_f: int, in_f: int) -> Hashable:
        """Adapters of this family with equal signatures share one slot table on a layer."""

    @abstractmethod
    def prepare(
        self, cfg: MethodConfig, params: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-slot serving tensors (normalised vectors, spectra, padded indices, ...).

        Shapes depend only on ``signature``; every adapter with that signature produces the
        same names and shapes. Must be differentiable w.r.t. ``params``.
        """

    def serving_cost(self, sig: Hashable) -> Literal["cheap", "gemm"]:
        """``gemm`` if on-the-fly needs extra full GEMMs (HUT rank>1): serve merged instead."""
        return "cheap"

    # Each hook gets the rows of one group and returns the new rows (pre/post) or the
    # addition (delta). Return None from a hook the signature does not use.
    def pre(self, sig: Hashable, x: torch.Tensor, table: dict, slots: torch.Tensor | None):
        return None

    def post(self, sig: Hashable, y: torch.Tensor, table: dict, slots: torch.Tensor | None):
        return None

    def delta(
        self, sig: Hashable, x: torch.Tensor, table: dict, slots: torch.Tensor | None, weight: torch.Tensor
    ):
        return None

    def hooks(self, sig: Hashable) -> frozenset[str]:
        """Which of ``pre``, ``post``, ``delta`` this signature uses (lets the engine skip work)."""
        return frozenset({"pre", "post", "delta"})

    def fast_op(self, kernels: Any, sig: Hashable, hook: str, shared: Any) -> FastOp | None:
        """The fused CPU kernel doing ``hook`` in place for a group of this signature, or None: the
        torch hook above then runs. ``kernels`` is the compiled module (``server/kernels``, never
        None here); ``shared`` the step's ``server.kernels.fast.SharedInputs`` (input spectra that
        sibling projections reuse). Families without kernels keep this default."""
        return None

    def kernel_max_rows(self, sig: Hashable, hook: str) -> int | None:
        """The most rows of one group for which ``fast_op``'s kernel beats the torch hook (measured;
        a larger group, a prefill's, then gets the torch code), or None: any number of rows."""
        return None

    def native_op(self, kernels: Any, sig: Hashable, hook: str, group: Any, shared: Any) -> Any | None:
        """``fast_op``'s kernel bound to one group's rows, slots and tables: a ``NativeOp`` of the
        compiled module (``kernels.op_*``), which a ``Projection`` runs with no Python between the
        kernels (``server/kernels/plan_cpu.cpp``), or None: ``fast_op`` then serves the group.
        ``shared``: ``server.kernels.fast.NativeShared`` (the binding's spectra and the scope).
        Asked only for a hook whose ``fast_op`` is not None (``server.kernels.fast.native_op``)."""
        return None
