"""Errors of the adapter store. Each maps to one HTTP status and names what is wrong.

``where`` names the field, tensor or limit at fault (``"adapter_id"``, ``"r"``,
``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``, ``"max_weights_bytes"``, ...).
Messages never contain filesystem paths, user names or stack traces: they are safe to return
to a client as is (``to_dict``).
"""

from __future__ import annotations


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StoreError(Exception):
    """Base class. ``status`` is the HTTP status an API layer should answer with."""

    status: int = 500
    code: str = "store_error"

    MAX_WHERE = 256  # tensor names and config keys come from the client: keep echoes short
    MAX_MESSAGE = 1024

    def __init__(self, where: str, message: str):
        self.where = _clip(str(where), self.MAX_WHERE)
        self.message = _clip(str(message), self.MAX_MESSAGE)
        super().__init__(f"{self.where}: {self.message}")

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "where": self.where, "message": self.message}


class ValidationError(StoreError):
    """The upload (id, config or weights) is malformed or does not fit the base model."""

    status = 422
    code = "validation_error"


class TooLarge(ValidationError):
    """A size or count limit was exceeded; ``where`` is the limit's name (e.g. ``max_weights_bytes``)."""

    status = 413
    code = "too_large"


class NotFound(StoreError):
    """No such adapter (or no such version of it). Same message for every missing id."""

    status = 404
    code = "not_found"

    def __init__(self, where: str = "adapter_id", message: str = "no adapter with this id"):
        super().__init__(where, message)


class Conflict(StoreError):
    """The request cannot be served in the adapter's current state."""

    status = 409
    code = "conflict"


class Corrupt(Conflict):
    """A stored adapter failed its integrity check and is quarantined until re-uploaded or deleted."""

    code = "adapter_corrupt"
    HINT = "re-upload the adapter (or delete it)"

    def __init__(self, where: str, message: str):
        if self.HINT not in message:
            message = f"{message}; {self.HINT}"
        super().__init__(where, message)


class StorageFull(StoreError):
    """The disk under the store is full (ENOSPC/EDQUOT); nothing was stored."""

    status = 507
    code = "insufficient_storage"


class Unavailable(StoreError):
    """A remote backend (S3, PostgreSQL) did not answer; nothing is known to be damaged: retry."""

    status = 503
    code = "store_unavailable"
