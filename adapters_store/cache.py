"""A bounded, verified, local read-through cache of remote blobs (one per replica).

Objects are immutable per key, so a cached copy never goes stale; it can only be damaged (a bad
disk, a stray writer). Every read of a cached copy is therefore checked against the sha256 the
index row records: a copy that does not match is dropped and the object fetched again, and a
fetched object that does not match is refused (``ChecksumMismatch``) and never cached. What is
returned always has the recorded digest.

The bound is on bytes: after an insert the least recently used copies are evicted until the total
is at most ``max_bytes`` (an object larger than the bound is returned but not kept). The cache
folder is this process's own: it is emptied when the cache opens. Thread-safe.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .fsutil import read_bounded, remove_tree


class ChecksumMismatch(Exception):
    """The object in the blob store itself does not match the index row's sha256."""


class BlobCache:
    def __init__(self, folder: Path, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("cache max_bytes must be >= 0")
        self.folder = Path(folder)
        remove_tree(self.folder)
        self.folder.mkdir(parents=True)
        self.max_bytes = max_bytes
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> size
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.hits = self.misses = self.evictions = self.refetches = 0

    def _path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def read(self, key: str, sha256: str, max_bytes: int, fetch: Callable[[], bytes]) -> bytes:
        """The object's bytes, verified against ``sha256``: from the cache, else from ``fetch``
        (then cached). A result longer than ``max_bytes`` is returned as is (the caller's size
        check refuses it) and not cached."""
        cached = self._read_cached(key, max_bytes)
        if cached is not None:
            if hashlib.sha256(cached).hexdigest() == sha256:
                with self._lock:
                    self.hits += 1
                return cached
            with self._lock:
                self.refetches += 1
            self._drop(key)
        with self._lock:
            self.misses += 1
        data = fetch()
        if len(data) > max_bytes:
            return data
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ChecksumMismatch(key)
        self._insert(key, data)
        return data

    def path(self, key: str) -> Path | None:
        """The cached file of ``key`` (for streaming a download), or None; the caller verified it
        through ``read`` just before. It may be evicted meanwhile: open it at once."""
        with self._lock:
            if key not in self._lru:
                return None
            self._lru.move_to_end(key)
        return self._path(key)

    def _read_cached(self, key: str, max_bytes: int) -> bytes | None:
        with self._lock:
            if key not in self._lru:
                return None
            self._lru.move_to_end(key)
        try:
            return read_bounded(self._path(key), max_bytes)
        except OSError:
            self._drop(key)
            return None

    def _insert(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(data)  # no fsync: a lost copy is refetched, a damaged one is detected
        with self._lock:
            os.replace(tmp, self._path(key))
            if key in self._lru:
                self.total_bytes -= self._lru.pop(key)
            self._lru[key] = len(data)
            self.total_bytes += len(data)
            while self.total_bytes > self.max_bytes:
                old, size = self._lru.popitem(last=False)
                self._path(old).unlink(missing_ok=True)
                self.total_bytes -= size
                self.evictions += 1

    def _drop(self, key: str) -> None:
        with self._lock:
            size = self._lru.pop(key, None)
            if size is not None:
                self.total_bytes -= size
                self._path(key).unlink(missing_ok=True)
