"""The durable adapter store: validated uploads, versioned files, a SQLite index, quarantine.

Layout under ``root`` (a trusted zone: only this class writes there)::

    index.sqlite3                                    one row per adapter (current version)
    staging/<uuid>/                                  uploads being written (swept at open)
    adapters/<adapter_id>/v<version>/adapter_config.json
    adapters/<adapter_id>/v<version>/adapter_model.safetensors

``put``: validate everything in memory (``validate.py``) -> write both files into a fresh
staging folder, fsync each file and the folder -> reserve a version number in SQLite -> rename
the folder to ``adapters/<id>/v<version>`` and fsync the parent -> commit the row in one SQLite
transaction -> remove the previous version's folder (the engine keeps in-flight copies in
memory). A crash before the commit leaves a folder no row points to, which the next open removes;
a crash after it leaves a stale old version folder, also removed at open.

``load``: re-hash both files and re-validate them against the base model; any mismatch marks
the adapter ``quarantined`` (with the reason) and raises ``Corrupt`` (409) until it is
re-uploaded or deleted. Other adapters are unaffected.

Thread-safe: SQLite connections are per call; writers of one id (put/delete) serialise on a
per-id lock, so concurrent re-uploads get versions 1..N with exactly one current. One process
owns a store root at a time.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from server.methods import Adapter

from .errors import Conflict, Corrupt, NotFound, StoreError, TooLarge, ValidationError
from .fsutil import disk_full_error, fsync_dir, is_disk_full, read_bounded, remove_tree, write_durable
from .ids import CONFIG_NAME, FILE_NAMES, WEIGHTS_NAME, adapter_dir, check_id, version_dir
from .index import QUARANTINED, READY, AdapterRecord, Index, Row, is_full
from .limits import StoreLimits
from .recovery import OpenReport, open_index, sweep
from .validate import canonical_config_bytes, validate_config, validate_upload, validate_weights

MAX_PAGE = 1000
_LOCK_STRIPES = 64


def _fault_point(stage: str) -> None:
    """No-op hook between the durable steps of ``put`` (tests make it raise to simulate a crash).

    Stages, in order: ``staged``, ``allocated``, ``renamed``, ``committed``.
    """


def _discard_uncommitted(path: Path) -> None:
    """Best-effort removal of an upload that did not commit (the next open sweeps it otherwise)."""
    try:
        remove_tree(path)
    except OSError:
        pass


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
    ):
        """``table_dtype``: the engine's serving dtype; every adapter's prepared slot tables must be
        finite in it (at upload and at every load)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.adapters_root = self.root / "adapters"
        self.staging_root = self.root / "staging"
        self.adapters_root.mkdir(exist_ok=True)
        self.staging_root.mkdir(exist_ok=True)
        self.module_shapes = {k: (int(v[0]), int(v[1])) for k, v in module_shapes.items()}
        self.base_model_name = base_model_name
        self.table_dtype = table_dtype
        self.limits = limits or StoreLimits()
        # Stored configs are canonical JSON, which can be longer than the upload (defaults added).
        self._stored_limits = replace(self.limits, max_config_bytes=self.limits.max_config_bytes * 8)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self.open_report = OpenReport()
        self._index: Index = open_index(self.root, self._revalidate, base_model_name, self.open_report)
        sweep(self.root, self._index, self.open_report)

    def close(self) -> None:
        """Release the index file (the store holds no other resources). Optional."""
        self._index.close()

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------
    def put(self, adapter_id: str, config_bytes: bytes, weights_file: Path | bytes) -> AdapterRecord:
        """Validate and store an upload as the next version of ``adapter_id``; return its record.

        Raises ValidationError (422) / TooLarge (413) before anything is written, StorageFull (507)
        if the disk fills up (nothing is left behind).
        """
        check_id(adapter_id)
        up = validate_upload(config_bytes, weights_file, self.module_shapes, self.limits, self.table_dtype)
        if len(up.config_bytes) > self._stored_limits.max_config_bytes:
            raise TooLarge("max_config_bytes", "adapter_config.json is too large once defaults are filled in")
        with self._lock(adapter_id):
            staging = self.staging_root / uuid.uuid4().hex
            final: Path | None = None
            committed = False
            try:
                os.mkdir(staging)
                write_durable(staging / CONFIG_NAME, up.config_bytes)
                write_durable(staging / WEIGHTS_NAME, up.weights)
                fsync_dir(staging)
                _fault_point("staged")
                version = self._index.allocate_version(adapter_id)
                _fault_point("allocated")
                id_dir = adapter_dir(self.adapters_root, adapter_id)
                if not id_dir.is_dir():
                    id_dir.mkdir()
                    fsync_dir(self.adapters_root)
                final = version_dir(self.adapters_root, adapter_id, version)
                os.rename(staging, final)
                fsync_dir(id_dir)
                fsync_dir(self.staging_root)
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
                    _discard_uncommitted(staging)
                    if final is not None:
                        _discard_uncommitted(final)
                if is_disk_full(e) or is_full(e):
                    raise disk_full_error() from None
                raise
            if previous is not None:  # committed: the old version's files are garbage now
                try:
                    _discard_uncommitted(version_dir(self.adapters_root, adapter_id, previous))
                except StoreError:
                    pass  # a planted link; the next open's sweep removes it
        return rec

    def delete(self, adapter_id: str) -> AdapterRecord:
        """Remove the adapter (row first, then files); NotFound if absent. Returns the removed record."""
        check_id(adapter_id)
        with self._lock(adapter_id):
            row = self._index.delete(adapter_id)
            if row is None:
                raise NotFound()
            _discard_uncommitted(adapter_dir(self.adapters_root, adapter_id))
        return row.record

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
        """Path of ``adapter_config.json`` or ``adapter_model.safetensors`` of the current version."""
        if name not in FILE_NAMES:
            raise ValidationError("name", f"file name must be one of {list(FILE_NAMES)}")
        row = self._row(adapter_id)
        return version_dir(self.adapters_root, adapter_id, row.version) / name

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

    def _read(self, folder: Path, name: str, max_bytes: int) -> bytes:
        try:
            return read_bounded(folder / name, max_bytes)
        except FileNotFoundError:
            raise _Damaged(name, f"{name} is missing") from None
        except OSError as e:
            raise _Damaged(name, f"{name} is unreadable ({e.strerror or 'I/O error'})") from None

    def _verify(self, row: Row) -> Adapter:
        rec = row.record
        try:
            folder = version_dir(self.adapters_root, rec.adapter_id, rec.version)
        except Corrupt as e:
            raise _Damaged("adapter_id", e.message) from None
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

    def _revalidate(self, adapter_id: str, version: int, folder: Path) -> Row:
        """Rebuild an index row from a version folder (used when the index was damaged)."""
        config = read_bounded(folder / CONFIG_NAME, self._stored_limits.max_config_bytes)
        weights = read_bounded(folder / WEIGHTS_NAME, self.limits.max_weights_bytes)
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
            created_at=(folder / WEIGHTS_NAME).stat().st_mtime,
            status=READY,
            error=None,
        )
        return Row(rec, hashlib.sha256(config).hexdigest(), self.base_model_name)
