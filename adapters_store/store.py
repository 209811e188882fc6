"""The durable adapter store: validated uploads, immutable versioned blobs, an index, quarantine.

Two halves (``backends.py``): a **blob store** holds each version's two files under immutable keys
``adapters/<adapter_id>/v<version>/{adapter_config.json,adapter_model.safetensors}`` (local files
by default, or S3), and an **index** holds one row per adapter, its current version with both
files' sha256 (SQLite by default, or PostgreSQL). With the defaults the layout under ``root`` is::

    index.sqlite3                                    one row per adapter (current version)
    staging/<uuid>/                                  uploads being written (swept at open)
    adapters/<adapter_id>/v<version>/adapter_config.json
    adapters/<adapter_id>/v<version>/adapter_model.safetensors
    cache/                                           read-through cache (remote blob stores only)

``put``: validate everything in memory (``validate.py``) -> stage both files (local: a fresh
staging folder, each file and the folder fsynced) -> reserve a version number in the index ->
publish the files under the version's keys with a conditional create (local: rename the folder
into place; S3: ``If-None-Match: *``) -> commit the row -> remove the previous version's blobs
(the engine keeps in-flight copies in memory). The row commits only after its blobs, so a crash
leaves at worst blobs that no row points to, which the garbage collector (``gc.py``, run at open
and by ``gc()``) removes; never a row without its blobs.

``delete`` removes the row and leaves a tombstone in the index (one transaction), then removes the
version's blobs; a crash in between leaves blobs the GC removes.

``load``: re-hash both files and re-validate them against the base model; any mismatch marks
the adapter ``quarantined`` (with the reason) and raises ``Corrupt`` (409) until it is
re-uploaded or deleted. Other adapters are unaffected. With a remote blob store, reads go through
a bounded local cache (``cache.py``) that checks every copy against the row's sha256.

Thread-safe: writers of one id (put/delete, and the GC for that id) serialise on a per-id lock,
so concurrent re-uploads get versions 1..N with exactly one current. With local blobs and the
SQLite index one process owns a store root; with S3 and PostgreSQL any number of replicas share
one store (the index serialises writers of one id across them).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from server.methods import Adapter

from .backends import (
    BlobError,
    BlobExists,
    BlobInfo,
    BlobMissing,
    BlobStore,
    BlobUnavailable,
    Index,
    blob_key,
    version_prefix,
)
from .blobs_local import LocalBlobStore
from .cache import BlobCache, ChecksumMismatch
from .errors import Conflict, Corrupt, NotFound, StoreError, TooLarge, Unavailable, ValidationError
from .fsutil import disk_full_error, fsync_dir, is_disk_full, write_durable
from .gc import SHARED_GRACE_S, GcReport, collect_garbage
from .ids import CONFIG_NAME, FILE_NAMES, WEIGHTS_NAME, check_id
from .index import QUARANTINED, READY, AdapterRecord, Row, is_full
from .limits import StoreLimits
from .recovery import OpenReport, open_sqlite_index, sweep
from .validate import canonical_config_bytes, validate_config, validate_upload, validate_weights

MAX_PAGE = 1000
_LOCK_STRIPES = 64
DEFAULT_CACHE_BYTES = 1 << 30


def _fault_point(stage: str) -> None:
    """No-op hook between the durable steps of ``put`` (tests make it raise, or exit the process,
    to simulate a crash). Stages, in order: ``staged``, ``allocated``, ``renamed`` (the blobs are
    published under their keys; a rename on local files), ``committed`` (the index row)."""


@dataclass
class _Doomed:
    """Blobs that no committed row needs: a stage never published, and/or a version's prefix."""

    blobs: BlobStore
    staged: Any = None
    prefix: str | None = None

    def remove(self) -> None:
        if self.staged is not None:
            self.blobs.discard(self.staged)
        if self.prefix is not None:
            self.blobs.delete_prefix(self.prefix)


def _discard_uncommitted(doomed: _Doomed) -> None:
    """Best-effort removal of blobs no row needs (the garbage collector removes them otherwise)."""
    try:
        doomed.remove()
    except (OSError, BlobError, StoreError):  # StoreError: a planted link; the GC removes it
        pass


# The local blob store's file primitives, looked up in this module at call time: crash tests
# fault one exact step here (``write_durable`` of one file, ``os.rename``, one ``fsync_dir``).
_MODULE_FS = SimpleNamespace(
    write_durable=lambda path, data: write_durable(path, data),
    fsync_dir=lambda path: fsync_dir(path),
    rename=lambda src, dst: os.rename(src, dst),
)


def _unavailable() -> Unavailable:
    return Unavailable("storage", "the adapter blob store is unreachable; retry")


@dataclass(frozen=True)
class _Version:
    """One version's key prefix and the sha256 its row records for each file (``_read``'s folder)."""

    prefix: str
    digests: dict[str, str]


class _Damaged(Exception):
    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(reason)


class AdapterStore:
    def __init__(
        self,
        root: Path | str,
        module_shapes: Mapping[str, tuple[int, int]],
        base_model_name: str,
        limits: StoreLimits | None = None,
        table_dtype: torch.dtype = torch.float32,
        *,
        blobs: BlobStore | None = None,
        index: Index | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        orphan_grace_s: float | None = None,
    ):
        """``table_dtype``: the engine's serving dtype; every adapter's prepared slot tables must be
        finite in it (at upload and at every load).

        ``blobs``/``index``: the backends (``backends.open_backends``); None means local files and
        SQLite under ``root``. ``root`` also holds the read-through cache of a remote blob store
        (``cache_bytes`` at most). ``orphan_grace_s``: how old a blob no row points to must be
        before the GC removes it; default 0 for local blobs (one process owns them), 15 minutes
        for shared ones (another replica may be between its blobs and its row)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.adapters_root = self.root / "adapters"
        self.staging_root = self.root / "staging"
        self._blobs: BlobStore = blobs if blobs is not None else LocalBlobStore(self.root, fs=_MODULE_FS)
        self._cache = BlobCache(self.root / "cache", cache_bytes) if self._blobs.remote else None
        self.module_shapes = {k: (int(v[0]), int(v[1])) for k, v in module_shapes.items()}
        self.base_model_name = base_model_name
        self.table_dtype = table_dtype
        self.limits = limits or StoreLimits()
        # Stored configs are canonical JSON, which can be longer than the upload (defaults added).
        self._stored_limits = replace(self.limits, max_config_bytes=self.limits.max_config_bytes * 8)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        if orphan_grace_s is None:
            orphan_grace_s = 0.0 if self._blobs.single_owner else SHARED_GRACE_S
        self.orphan_grace_s = float(orphan_grace_s)
        self.open_report = OpenReport()
        if index is None:
            index = open_sqlite_index(
                self.root, self._blobs, self._revalidate, base_model_name, self.open_report
            )
        else:
            index.open()
        self._index: Index = index
        sweep(self._blobs, self._index, self.open_report, self.orphan_grace_s, self._lock)

    def close(self) -> None:
        """Release the index and the blob store's connections. Optional."""
        self._index.close()
        self._blobs.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def blobs(self) -> BlobStore:
        return self._blobs

    @property
    def index(self) -> Index:
        return self._index

    @property
    def cache(self) -> BlobCache | None:
        """The read-through cache (remote blob stores only)."""
        return self._cache

    # ---- writes ------------------------------------------------------------------------------
    def put(self, adapter_id: str, config_bytes: bytes, weights_file: Path | bytes) -> AdapterRecord:
        """Validate and store an upload as the next version of ``adapter_id``; return its record.

        Raises ValidationError (422) / TooLarge (413) before anything is written, StorageFull (507)
        if the disk fills up (nothing is left behind).
        """
        return self.put_replacing(adapter_id, config_bytes, weights_file)[0]

    def put_replacing(
        self, adapter_id: str, config_bytes: bytes, weights_file: Path | bytes
    ) -> tuple[AdapterRecord, int | None]:
        """``put``, also returning the version this one replaced (None for a new id), as the
        index's commit saw it: reading ``current_version`` first could name a version another
        writer had already replaced, so a cache keyed by version would miss one and drop one twice."""
        check_id(adapter_id)
        up = validate_upload(config_bytes, weights_file, self.module_shapes, self.limits, self.table_dtype)
        if len(up.config_bytes) > self._stored_limits.max_config_bytes:
            raise TooLarge("max_config_bytes", "adapter_config.json is too large once defaults are filled in")
        with self._lock(adapter_id):
            doomed = _Doomed(self._blobs)
            committed = False
            try:
                doomed.staged = self._blobs.new_stage()
                self._blobs.stage(doomed.staged, {CONFIG_NAME: up.config_bytes, WEIGHTS_NAME: up.weights})
                _fault_point("staged")
                version = self._index.allocate_version(adapter_id)
                _fault_point("allocated")
                self._publish(doomed, version_prefix(adapter_id, version))
                _fault_point("renamed")
                rec = AdapterRecord(
                    adapter_id=adapter_id,
                    version=version,
                    family=up.family,
                    config=up.config,
                    trainable_params=up.trainable_params,
                    nbytes=len(up.weights),
                    sha256=up.sha256,
                    created_at=time.time(),
                    status=READY,
                    error=None,
                )
                previous = self._index.commit(
                    Row(rec, hashlib.sha256(up.config_bytes).hexdigest(), self.base_model_name)
                )
                if previous == -1:
                    raise Conflict("adapter_id", "a newer version of this adapter was stored concurrently")
                committed = True
                _fault_point("committed")
            except BaseException as e:
                if not committed:
                    _discard_uncommitted(doomed)
                if is_disk_full(e) or is_full(e) or self._index.is_full(e):
                    raise disk_full_error() from None
                if isinstance(e, BlobUnavailable):
                    raise _unavailable() from e
                raise
            if previous is not None:  # committed: the old version's blobs are garbage now
                _discard_uncommitted(_Doomed(self._blobs, prefix=version_prefix(adapter_id, previous)))
        return rec, previous

    def _publish(self, doomed: _Doomed, prefix: str) -> None:
        doomed.prefix = prefix  # from here on a failure may leave our blobs there: remove them
        try:
            self._blobs.publish(doomed.staged, prefix)
        except BlobExists:
            doomed.prefix = None  # not ours: never remove what another writer put
            raise Conflict(
                "adapter_id", "the blob store already holds this version; the index is behind it"
            ) from None

    def delete(self, adapter_id: str) -> AdapterRecord:
        """Remove the adapter (row -> tombstone first, then blobs); NotFound if absent. Returns the
        removed record."""
        check_id(adapter_id)
        with self._lock(adapter_id):
            row = self._index.delete(adapter_id)
            if row is None:
                raise NotFound()
            _discard_uncommitted(_Doomed(self._blobs, prefix=version_prefix(adapter_id, row.version)))
        return row.record

    def gc(self, grace_s: float | None = None) -> GcReport:
        """Remove blobs that no row needs (``gc.py``); also run at every open."""
        grace = self.orphan_grace_s if grace_s is None else grace_s
        return collect_garbage(self._blobs, self._index, grace, self._lock)

    # ---- reads -------------------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of the current version (also when quarantined: see ``status``/``error``)."""
        return self._row(adapter_id).record

    def list(self, offset: int = 0, limit: int = 100) -> tuple[list[AdapterRecord], int]:
        """One page of records ordered by id, and the total number of adapters."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValidationError("offset", "offset must be an integer >= 0")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValidationError("limit", f"limit must be an integer in [1, {MAX_PAGE}]")
        rows, total = self._index.page(offset, limit)
        return [r.record for r in rows], total

    def current_version(self, adapter_id: str) -> int | None:
        """The current version, None if there is no such adapter (quarantine is reported by load)."""
        check_id(adapter_id)
        row = self._index.get(adapter_id)
        return None if row is None else row.version

    def file_path(self, adapter_id: str, name: str) -> Path:
        """Path of ``adapter_config.json`` or ``adapter_model.safetensors`` of the current version.

        With a remote blob store: a cached copy checked against the row's sha256 just now (open
        it at once: the cache may evict it later); Corrupt (and quarantined) if the blob is not."""
        if name not in FILE_NAMES:
            raise ValidationError("name", f"file name must be one of {list(FILE_NAMES)}")
        row = self._row(adapter_id)
        key = blob_key(adapter_id, row.version, name)
        if self._cache is None:
            return self._blobs.local_path(key)
        limit = self._stored_limits.max_config_bytes if name == CONFIG_NAME else row.record.nbytes
        try:
            data = self._read(self._version(row), name, limit)
            if len(data) > limit:
                raise _Damaged(name, f"{name} has the wrong size")
        except _Damaged as d:
            self._index.quarantine(adapter_id, row.version, row.record.sha256, d.reason)
            raise Corrupt(d.where, d.reason) from None
        path = self._cache.path(key)
        if path is None:
            raise Conflict("store_cache_bytes", "the file is larger than the local cache; raise its size")
        return path

    def total_bytes(self) -> int:
        """Sum of ``nbytes`` (weights file sizes) over all stored adapters."""
        return self._index.total_bytes()

    def load(self, adapter_id: str, version: int | None = None) -> Adapter:
        """Verify (sha256 of both files, full re-validation) and load the adapter into owned memory.

        ``version`` None means the current one; another version than the current -> NotFound.
        Raises Corrupt (409) and quarantines the adapter when a check fails; Corrupt again on
        every later load until it is re-uploaded or deleted.
        """
        for _ in range(3):
            row = self._row(adapter_id)
            if version is not None and row.version != version:
                raise NotFound("version", "this version of the adapter is no longer stored")
            rec = row.record
            if rec.status == QUARANTINED:
                raise Corrupt("adapter_id", f"adapter is quarantined ({rec.error})")
            if row.base_model != self.base_model_name:
                raise Conflict("base_model", "adapter was stored for another base model; re-upload it")
            try:
                return self._verify(row)
            except _Damaged as d:
                if self._index.quarantine(adapter_id, row.version, rec.sha256, d.reason):
                    raise Corrupt(d.where, d.reason) from None
                # The row changed under us (re-upload/delete): look again.
        raise Conflict("adapter_id", "adapter changed repeatedly while loading; retry")

    # ---- internals ---------------------------------------------------------------------------
    def _lock(self, adapter_id: str) -> threading.Lock:
        return self._locks[zlib.crc32(adapter_id.encode()) % _LOCK_STRIPES]

    def _row(self, adapter_id: str) -> Row:
        check_id(adapter_id)
        row = self._index.get(adapter_id)
        if row is None:
            raise NotFound()
        return row

    @staticmethod
    def _version(row: Row) -> _Version:
        digests = {CONFIG_NAME: row.config_sha256, WEIGHTS_NAME: row.record.sha256}
        return _Version(version_prefix(row.adapter_id, row.version), digests)

    def _read(self, folder: _Version, name: str, max_bytes: int) -> bytes:
        """One file of a version, at most ``max_bytes + 1`` bytes; through the cache when remote."""
        key = folder.prefix + name
        try:
            if self._cache is None:
                return self._blobs.get(key, max_bytes)
            fetch = lambda: self._blobs.get(key, max_bytes)
            return self._cache.read(key, folder.digests[name], max_bytes, fetch)
        except BlobUnavailable as e:
            raise _unavailable() from e  # not damage: never quarantine for it
        except BlobMissing:
            raise _Damaged(name, f"{name} is missing") from None
        except ChecksumMismatch:
            raise _Damaged(name, f"{name} does not match its recorded sha256") from None
        except Corrupt as e:
            raise _Damaged("adapter_id", e.message) from None
        except OSError as e:
            raise _Damaged(name, f"{name} is unreadable ({e.strerror or 'I/O error'})") from None

    def _verify(self, row: Row) -> Adapter:
        rec = row.record
        folder = self._version(row)
        config = self._read(folder, CONFIG_NAME, self._stored_limits.max_config_bytes)
        if hashlib.sha256(config).hexdigest() != row.config_sha256:
            raise _Damaged(CONFIG_NAME, f"{CONFIG_NAME} does not match its recorded sha256")
        weights = self._read(folder, WEIGHTS_NAME, rec.nbytes)
        if len(weights) != rec.nbytes:
            raise _Damaged(WEIGHTS_NAME, f"{WEIGHTS_NAME} has the wrong size")
        if hashlib.sha256(weights).hexdigest() != rec.sha256:
            raise _Damaged(WEIGHTS_NAME, f"{WEIGHTS_NAME} does not match its recorded sha256")
        try:
            method, cfg = validate_config(config, self._stored_limits)
            _, adapter = validate_weights(
                method, cfg, weights, self.module_shapes, self._stored_limits, self.table_dtype
            )
        except StoreError as e:
            raise _Damaged(e.where, f"stored files no longer validate ({e.where}: {e.message})") from None
        return adapter

    def _revalidate(self, adapter_id: str, version: int, infos: dict[str, BlobInfo]) -> Row:
        """Rebuild an index row from a version's blobs (used when the index was damaged)."""
        prefix = version_prefix(adapter_id, version)
        config = self._blobs.get(prefix + CONFIG_NAME, self._stored_limits.max_config_bytes)
        weights = self._blobs.get(prefix + WEIGHTS_NAME, self.limits.max_weights_bytes)
        up = validate_upload(config, weights, self.module_shapes, self._stored_limits, self.table_dtype)
        cfg_dict, _ = canonical_config_bytes(up.adapter.config)
        rec = AdapterRecord(
            adapter_id=adapter_id,
            version=version,
            family=up.family,
            config=cfg_dict,
            trainable_params=up.trainable_params,
            nbytes=len(weights),
            sha256=up.sha256,
            created_at=infos[WEIGHTS_NAME].mtime,
            status=READY,
            error=None,
        )
        return Row(rec, hashlib.sha256(config).hexdigest(), self.base_model_name)
