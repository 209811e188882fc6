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


def method_for_peft_type(peft_type: object, raw: dict | None = None) -> AdapterMethod:
    """The family serving a PEFT config: registered for ``peft_type`` and claiming ``raw``.

    Each family declares its ``peft_type`` and, where several share one (LORA with and without
    ``use_dora``), which configs it claims (``claims_peft``); nothing else maps types to families.
    """
    raw = raw if raw is not None else {}
    if isinstance(peft_type, str):
        for m in _METHODS.values():
            if m.peft_type == peft_type.upper() and m.claims_peft(raw):
                return m
    raise ConfigError(
        "peft_type",
        f"unsupported peft_type {peft_type!r}; supported: {sorted({m.peft_type for m in _METHODS.values()})}",
    )


def available_methods() -> list[str]:
    return sorted(_METHODS)
