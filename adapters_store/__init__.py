"""Durable adapter store: strict upload validation, versioned files, SQLite index, quarantine.

    store = AdapterStore(Path("var/adapters"), base.module_shapes, "smollm2-135m-instruct")
    rec = store.put("my-adapter", config_bytes, weights_path_or_bytes)   # 422/413 before writing
    adapter = store.load("my-adapter", rec.version)                      # 409 Corrupt if damaged

Every error is a ``StoreError`` with ``.status`` (HTTP) and ``.where`` (field/tensor/limit).
"""

from .errors import (
    Conflict,
    Corrupt,
    NotFound,
    StorageFull,
    StoreError,
    TooLarge,
    Unavailable,
    ValidationError,
)
from .ids import CONFIG_NAME, ID_PATTERN, WEIGHTS_NAME, check_id, is_valid_id
from .index import AdapterRecord
from .limits import StoreLimits
from .recovery import OpenReport
from .store import AdapterStore

__all__ = [
    "CONFIG_NAME",
    "ID_PATTERN",
    "WEIGHTS_NAME",
    "AdapterRecord",
    "AdapterStore",
    "Conflict",
    "Corrupt",
    "NotFound",
    "OpenReport",
    "StorageFull",
    "StoreError",
    "StoreLimits",
    "TooLarge",
    "Unavailable",
    "ValidationError",
    "check_id",
    "is_valid_id",
]
