"""Adapter families: the math, one module per family, behind a registry.

Importing this package imports every module in it, and each family module registers its family
(``register_method``): adding a family is adding its file, nothing else names it.
"""

import importlib
import pkgutil

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

# Infrastructure modules hold no family; every other module here registers one at import.
_INFRASTRUCTURE = {"adapter", "base", "batched", "converted", "registry"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRASTRUCTURE and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
