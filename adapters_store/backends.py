"""The two halves of the store, as protocols: a ``BlobStore`` (immutable objects) and an ``Index``.

The store writes the files of one adapter version as objects under immutable keys::

    adapters/<adapter_id>/v<version>/adapter_config.json
    adapters/<adapter_id>/v<version>/adapter_model.safetensors

and then commits one index row that points at them (with their sha256). Version numbers come from
the index and are never reused, so a key is written once and never changed: a second put of the
same key is refused (``BlobExists``, the ``If-None-Match: *`` semantics of S3). A crash between the
blob and the index row leaves an orphan blob, which the garbage collector (``gc.py``) removes; the
index never points at a blob that was not written first.

Backends:

* blobs: ``LocalBlobStore`` (``blobs_local.py``, the default: files under the store root) or
  ``S3BlobStore`` (``blobs_s3.py``, boto3 with ``endpoint_url``);
* index: ``SqliteIndex`` (``index.py``, the default: ``<root>/index.sqlite3``) or
  ``PostgresIndex`` (``index_pg.py``, psycopg 3).

``open_backends`` picks them from URLs (``server/settings.py``: ``store_blob_url``,
``store_index_url``). boto3 and psycopg are imported only when their backend is chosen, so the
embedded default needs neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .ids import check_id, version_dir_name
from .index import Row

ADAPTERS_PREFIX = "adapters/"


class BlobError(Exception):
    """A blob store operation failed (never shown to clients as is: no paths, no URLs)."""


class BlobExists(BlobError):
    """A conditional create found the key already written (``If-None-Match: *`` failed)."""


class BlobMissing(BlobError):
    """No object under this key."""


class BlobUnavailable(BlobError):
    """The blob store did not answer (connection, timeout, 5xx): a retry may succeed."""


@dataclass(frozen=True)
class BlobInfo:
    """One listed object. ``regular`` is False for what the store did not write itself (a symlink
    or special file on the local filesystem); ``key`` ends with ``/`` for an empty folder."""

    key: str
    size: int
    mtime: float
    regular: bool = True


def version_prefix(adapter_id: str, version: int) -> str:
    """``adapters/<id>/v<n>/``: the immutable prefix of one version's objects."""
    return f"{ADAPTERS_PREFIX}{check_id(adapter_id)}/{version_dir_name(version)}/"


def blob_key(adapter_id: str, version: int, name: str) -> str:
    return version_prefix(adapter_id, version) + name


@runtime_checkable
class BlobStore(Protocol):
    """Immutable objects by key. Implementations are thread-safe."""

    #: True when one process owns the store (local files): orphans can be collected at once.
    single_owner: bool
    #: True when reads cross the network: the store reads through its local cache.
    remote: bool

    def put(self, key: str, data: bytes) -> None:
        """Create ``key`` with ``data``, durably; BlobExists if it already exists (never overwrites)."""

    def get(self, key: str, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes of the object (more means: too large); BlobMissing."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove one object; a missing one is fine."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (a folder: ``.../v3/``), or the one entry ``prefix``."""

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every object under ``prefix``, in no particular order."""

    def local_path(self, key: str) -> Path | None:
        """A path that reads the object in place, or None (remote stores: use the cache)."""

    def new_stage(self) -> Any:
        """A handle for one version's files before its number is known (local: a staging folder)."""

    def stage(self, staged: Any, files: Mapping[str, bytes]) -> None:
        """Write ``files`` into the stage (local: each file fsynced, then the folder)."""

    def publish(self, staged: Any, prefix: str) -> None:
        """Create ``prefix + name`` for every staged file, conditionally; BlobExists if taken."""

    def discard(self, staged: Any) -> None:
        """Remove what ``stage`` wrote if it was never published (best effort)."""

    def sweep_staging(self) -> int:
        """Remove leftovers of staging from a crash; return how many (run at open)."""

    def close(self) -> None: ...


@runtime_checkable
class Index(Protocol):
    """The adapters' rows (current version of each), the version counters and the tombstones.

    Writes of one id are atomic; ``commit`` refuses an older-or-equal version (returns -1), so two
    writers of one id can never leave an older version current.
    """

    def open(self) -> None:
        """Create the schema if needed and check it."""

    def close(self) -> None: ...

    def get(self, adapter_id: str) -> Row | None: ...

    def page(self, offset: int, limit: int) -> tuple[list[Row], int]:
        """One page ordered by id, and the total, from one snapshot."""

    def all_rows(self) -> list[Row]: ...

    def total_bytes(self) -> int: ...

    def allocate_version(self, adapter_id: str) -> int:
        """Reserve the next version number (never reused, also after deletes)."""

    def commit(self, row: Row) -> int | None:
        """Make ``row`` current; the version it replaced, None if new, -1 if not newer."""

    def delete(self, adapter_id: str) -> Row | None:
        """Remove the row and write a tombstone for its version, in one transaction."""

    def tombstones(self) -> dict[str, int]:
        """Deleted ids -> the highest version deleted (its blobs and older ones are garbage)."""

    def quarantine(self, adapter_id: str, version: int, sha256: str, reason: str) -> bool:
        """Quarantine exactly this stored version; False if the row changed meanwhile."""

    def is_full(self, exc: BaseException) -> bool:
        """``exc`` means the index's storage is full (mapped to 507)."""


def open_backends(
    root: Path,
    blob_url: str | None = None,
    index_url: str | None = None,
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> tuple[BlobStore | None, Index | None]:
    """Blob store and index named by URLs; None for the embedded defaults (local files, SQLite).

    ``blob_url``: ``None``/``"file"`` or ``s3://<bucket>[/<prefix>]``. ``index_url``:
    ``None``/``"sqlite"`` or ``postgresql://...`` (a libpq DSN). Raises ValueError on others.
    """
    blobs: BlobStore | None = None
    index: Index | None = None
    if blob_url not in (None, "", "file"):
        if not blob_url.startswith("s3://"):
            raise ValueError("store_blob_url must be 'file' or 's3://<bucket>[/<prefix>]'")
        from .blobs_s3 import S3BlobStore  # boto3 only when S3 is chosen

        bucket, _, prefix = blob_url.removeprefix("s3://").partition("/")
        blobs = S3BlobStore(bucket, prefix, endpoint_url=s3_endpoint, region_name=s3_region)
    if index_url not in (None, "", "sqlite"):
        if not index_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("store_index_url must be 'sqlite' or 'postgresql://...'")
        from .index_pg import PostgresIndex  # psycopg only when PostgreSQL is chosen

        index = PostgresIndex(index_url)
    return blobs, index
