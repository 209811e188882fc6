"""A PEFT type served by another family's math (docs/adapter-format.md, "PEFT types").

Some PEFT tuners are exactly an existing family after a change of variables: IA3 is HUT rank 1,
HiRA is HUT rank r+1. Such a type keeps PEFT's own files (its config fields, its tensor names:
an uploaded folder is stored and downloaded as written) and converts, per module, its tensors
into the family's parameters (``family_params``, differentiable, so training runs through it).
Every dense form and every serving hook is then the family's own, with the family's signature
nested in this type's (its slot tables stay apart from the family's; the family's fused kernels
serve them, since the tables are the family's own).

A type file subclasses ``ConvertedMethod``, declares ``family``, its config, its stored tensors
and the conversion, and registers itself: nothing else names it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable
from typing import ClassVar, Literal

import torch

from .base import AdapterMethod, FastOp, MethodConfig


class ConvertedMethod(AdapterMethod):
    family: ClassVar[AdapterMethod]  # the family whose math serves this type

    @abstractmethod
    def family_config(self, cfg: MethodConfig) -> MethodConfig:
        """The family config this type's config converts to (the same on every module)."""

    @abstractmethod
    def family_params(
        self,
        cfg: MethodConfig,
        params: dict[str, torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The family's parameters for one linear, from this type's stored tensors (``bias``: the
        linear's, for types whose math reaches it, see ``prepare_uses_bias``)."""

    # ---- dense forms ---------------------------------------------------------------------
    def reference_weight(self, cfg, params, weight, bias):
        fam = self.family_params(cfg, params, weight, bias)
        return self.family.reference_weight(self.family_config(cfg), fam, weight, bias)

    def merged_weight(self, cfg, params, weight, bias):
        fam = self.family_params(cfg, params, weight, bias)
        return self.family.merged_weight(self.family_config(cfg), fam, weight, bias)

    # ---- serving: the family's hooks under this type's signature ------------------------
    def signature(self, cfg: MethodConfig, out_f: int, in_f: int) -> Hashable:
        return (self.name, self.family.signature(self.family_config(cfg), out_f, in_f))

    def prepare(self, cfg, params, weight, bias=None):
        fam = self.family_params(cfg, params, weight, bias)
        return self.family.prepare(self.family_config(cfg), fam, weight)

    def serving_cost(self, sig: Hashable) -> Literal["cheap", "gemm"]:
        return self.family.serving_cost(sig[1])

    def hooks(self, sig: Hashable) -> frozenset[str]:
        return self.family.hooks(sig[1])

    def pre(self, sig, x, table, slots):
        return self.family.pre(sig[1], x, table, slots)

    def post(self, sig, y, table, slots):
        return self.family.post(sig[1], y, table, slots)

    def delta(self, sig, x, table, slots, weight):
        return self.family.delta(sig[1], x, table, slots, weight)

    def fast_op(self, kernels, sig, hook, shared) -> FastOp | None:
        return self.family.fast_op(kernels, sig[1], hook, shared)

    def kernel_max_rows(self, sig, hook) -> int | None:
        return self.family.kernel_max_rows(sig[1], hook)

    def native_op(self, kernels, sig, hook, group, shared):
        return self.family.native_op(kernels, sig[1], hook, group, shared)
