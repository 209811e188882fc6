"""Adapter families: the math, one module per family, behind a registry.

Importing this package registers every family.
"""

from . import dct, dora, ether, hira, hra, hut, ia3, loha, lokr, lora, surm, vera  # noqa: F401  (registration side effect)
from .adapter import Adapter, check_finite_tables, check_tables, parse_config
from .base import (
    AdapterError,
    AdapterMethod,
    ConfigError,
    MethodConfig,
    ParamSpec,
    WeightsError,
    matches_target,
)
from .batched import Group, adapted_forward, batched_linear, stack_prepared
from .registry import available_methods, get_method, method_for_peft_type

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterMethod",
    "ConfigError",
    "Group",
    "MethodConfig",
    "ParamSpec",
    "WeightsError",
    "adapted_forward",
    "available_methods",
    "batched_linear",
    "check_finite_tables",
    "check_tables",
    "get_method",
    "matches_target",
    "method_for_peft_type",
    "parse_config",
    "stack_prepared",
]
