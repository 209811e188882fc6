"""Size and value limits applied to every upload (and re-checked on every load)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoreLimits:
    max_config_bytes: int = 64 << 10  # adapter_config.json
    max_weights_bytes: int = 256 << 20  # adapter_model.safetensors, whole file
    max_header_bytes: int = 1 << 20  # the safetensors JSON header (N)
    max_tensors: int = 4096  # tensor entries in the header
    max_abs_value: float = 1e4  # |x| bound on every float tensor value (finite-but-huge guard)
    max_metadata_bytes: int = 16 << 10  # keys + values of the header's ``__metadata__``
    max_tensor_rank: int = 8  # entries of one tensor's shape list

    def __post_init__(self) -> None:
        for name in (
            "max_config_bytes",
            "max_weights_bytes",
            "max_header_bytes",
            "max_tensors",
            "max_metadata_bytes",
            "max_tensor_rank",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StoreLimits.{name} must be a positive int, got {value!r}")
        if not (self.max_abs_value > 0):  # also rejects NaN
            raise ValueError(f"StoreLimits.max_abs_value must be > 0, got {self.max_abs_value!r}")
