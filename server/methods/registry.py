"""Name -> adapter family. Each family module registers one instance at import."""

from __future__ import annotations

from .base import AdapterMethod, ConfigError

_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    name = method.name
    if name != name.lower() or name in _METHODS:
        raise ValueError(f"method name {name!r} must be lower case and unique")
    _METHODS[name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise ConfigError(
            "method", f"unknown adapter family {name!r}; known: {available_methods()}"
        ) from None


def method_for_peft_type(peft_type: object) -> AdapterMethod:
    for m in _METHODS.values():
        if isinstance(peft_type, str) and m.peft_type == peft_type.upper():
            return m
    raise ConfigError(
        "peft_type",
        f"unsupported peft_type {peft_type!r}; supported: {sorted(m.peft_type for m in _METHODS.values())}",
    )


def available_methods() -> list[str]:
    return sorted(_METHODS)
