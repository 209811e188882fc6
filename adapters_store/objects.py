"""Single immutable objects next to the adapters, in the same blob store: training files
(``files/<file id>.jsonl``) and fine-tune jobs' data and resume states (``jobs/<job id>/...``).

They follow the adapters' rules (``backends.py``): each key is written once with a conditional
create (``BlobExists`` if taken, never an overwrite); the row that points at an object (with its
sha256 and size) commits only after the object is written, so a crash leaves at worst an orphan
object, which ``collect_orphans`` removes once it is older than the grace period; every read is
checked against the row's sha256 (a remote blob store reads through the replica's bounded
``BlobCache``, which re-checks cached copies and never caches a bad object).

``ObjectStore`` wraps one blob store (and its cache) with those reads and writes; errors are the
store's own (``Corrupt`` 409, ``Unavailable`` 503, ``StorageFull`` 507).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from .backends import BlobExists, BlobMissing, BlobStore, BlobUnavailable
from .cache import BlobCache, ChecksumMismatch
from .errors import Conflict, Corrupt, StoreError, Unavailable
from .fsutil import disk_full_error, is_disk_full

log = logging.getLogger("facet.store")


def fault_point(stage: str) -> None:
    """No-op hook between an object and its row (the crash tests make it exit the process).
    Stages: ``file_object_written``, ``file_committed`` (``server.jobs.files``) and
    ``job_data_written`` (``server.jobs.runner``)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    def __init__(self, blobs: BlobStore, cache: BlobCache | None = None):
        self.blobs = blobs
        self.cache = cache if blobs.remote else None

    @property
    def shared(self) -> bool:
        """True when other processes may write this blob store (orphans need a grace period)."""
        return not self.blobs.single_owner

    def put(self, key: str, data: bytes) -> str:
        """Create ``key`` (never overwriting); return the sha256 to record in the row."""
        try:
            self.blobs.put(key, data)
        except BlobExists:
            raise Conflict("key", "the blob store already holds this object") from None
        except BlobUnavailable as e:
            raise Unavailable("storage", "the blob store is unreachable; retry") from e
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error() from None
            raise
        return sha256_hex(data)

    def get(self, key: str, sha256: str, nbytes: int, where: str) -> bytes:
        """The object's bytes, checked against the row's ``sha256`` and size; ``Corrupt`` (naming
        ``where``) if it is missing, of another size, or does not match."""

        def fetch() -> bytes:
            return self.blobs.get(key, nbytes)

        try:
            data = fetch() if self.cache is None else self.cache.read(key, sha256, nbytes, fetch)
        except BlobMissing:
            raise Corrupt(where, "the stored object is missing") from None
        except ChecksumMismatch:
            raise Corrupt(where, "the stored object does not match its checksum") from None
        except BlobUnavailable as e:
            raise Unavailable("storage", "the blob store is unreachable; retry") from e
        if len(data) != nbytes or sha256_hex(data) != sha256:
            raise Corrupt(where, "the stored object does not match its checksum")
        return data

    def delete(self, key: str) -> None:
        """Best effort: a blob left behind is an orphan for ``collect_orphans``."""
        try:
            if key.endswith("/"):  # an empty folder (local files)
                self.blobs.delete_prefix(key)
            else:
                self.blobs.delete(key)
        except (OSError, BlobUnavailable, StoreError):  # StoreError: a planted link
            log.warning("could not remove %s; the orphan collector will", key)

    def delete_prefix(self, prefix: str) -> None:
        try:
            self.blobs.delete_prefix(prefix)
        except (OSError, BlobUnavailable, StoreError):
            log.warning("could not remove %s; the orphan collector will", prefix)


def collect_orphans(
    objects: ObjectStore,
    prefix: str,
    owner_of: Callable[[str], str | None],
    is_live: Callable[[set[str]], set[str]],
    grace_s: float,
    now: float | None = None,
) -> int:
    """Remove the objects under ``prefix`` whose owner (``owner_of(key)``: a file or job id, None
    for a stray key) has no live row, once the newest object of that owner is older than
    ``grace_s`` (another replica may be between its object and its row). ``is_live(owners)``
    answers which owners still have a row; a deleted one (tombstone) has none. Returns the number
    of objects removed."""
    now = time.time() if now is None else now
    newest: dict[str | None, float] = {}
    keys: dict[str | None, list[str]] = {}
    for info in objects.blobs.list(prefix):
        owner = owner_of(info.key)
        keys.setdefault(owner, []).append(info.key)
        newest[owner] = max(newest.get(owner, 0.0), info.mtime)
    live = is_live({o for o in keys if o is not None})
    removed = 0
    for owner, owned in keys.items():
        if owner in live or now - newest[owner] < grace_s:
            continue
        for key in owned:
            objects.delete(key)
            removed += 1
        log.info("store gc: removed %d object(s) of %s under %s", len(owned), owner, prefix)
    return removed
