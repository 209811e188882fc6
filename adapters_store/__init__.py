"""Durable adapter store: strict upload validation, immutable versioned blobs, an index, quarantine.

    store = AdapterStore(Path("var/adapters"), base.module_shapes, "smollm2-135m-instruct")
    rec = store.put("my-adapter", config_bytes, weights_path_or_bytes)   # 422/413 before writing
    adapter = store.load("my-adapter", rec.version)                      # 409 Corrupt if damaged

Blobs on local files (default) or S3, the index in SQLite (default) or PostgreSQL:
``backends.open_backends(root, "s3://bucket/prefix", "postgresql://...")`` -> ``blobs=``, ``index=``
(docs/scale-out.md).

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
