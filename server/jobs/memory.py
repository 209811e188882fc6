"""How many tokens one training micro-batch may hold, from a memory budget.

A fine-tune runs in the serving process, and its activation memory grows with the tokens of a
micro-batch (examples are padded to the longest one): about 1.6 MB per token was measured on
SmolLM2-135M in float32, so ``batch_size=64, max_length=4096`` would want ~400 GB and take the
server down. ``TokenBudget`` turns a memory budget (``finetune_memory_bytes``, default a quarter
of the training device's memory) and a per-token cost (``finetune_bytes_per_token``, default
estimated from the model's shape) into a cap; the runner refuses a job over it at submit (422).

The estimate, ``element bytes x layers x (10 x hidden + 5 x intermediate)``, counts what a
decoder layer keeps for the backward pass per token (norms, q/k/v, attention output, MLP
gates), rounded up; it gives 1.61 MB for SmolLM2-135M, matching the measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from server.settings import Settings

from .data import Example

# Measured on SmolLM2-135M, float32, CPU: the figure for a model whose config says too little.
MEASURED_BYTES_PER_TOKEN = 1_600_000


def estimate_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Activation bytes per micro-batch token of a decoder-only model with ``config``."""
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not hidden or not layers:
        return MEASURED_BYTES_PER_TOKEN
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return element * int(layers) * (10 * int(hidden) + 5 * int(intermediate))


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device training runs on (host RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class TokenBudget:
    memory_bytes: int
    bytes_per_token: int

    @property
    def max_tokens(self) -> int:
        return max(1, self.memory_bytes // self.bytes_per_token)

    @classmethod
    def for_model(cls, settings: Settings, base) -> TokenBudget:
        memory = settings.finetune_memory_bytes
        if memory is None:
            memory = device_memory_bytes(torch.device(base.device)) // 4
        per_token = settings.finetune_bytes_per_token
        if per_token is None:
            per_token = estimate_bytes_per_token(base.model.config, base.dtype)
        return cls(memory, per_token)

    def problem(self, batch_size: int, *example_sets: list[Example] | None) -> str | None:
        """Why a micro-batch of ``batch_size`` of these examples does not fit, or None."""
        worst = 0
        for examples in example_sets:
            if examples:
                worst = max(worst, min(batch_size, len(examples)) * max(len(e.input_ids) for e in examples))
        if worst <= self.max_tokens:
            return None
        return (
            f"a micro-batch of batch_size={batch_size} examples padded to the longest one holds up to "
            f"{worst} tokens; the limit is {self.max_tokens} tokens (finetune_memory_bytes="
            f"{self.memory_bytes} / {self.bytes_per_token} bytes per token); lower batch_size or "
            "max_length (raise grad_accum to keep the effective batch)"
        )
