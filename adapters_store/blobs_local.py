"""The local-filesystem blob store (the default): a key is a file path under the store root.

    <root>/staging/<uuid>/<file>          one version being written (swept at open)
    <root>/adapters/<id>/v<n>/<file>      published objects (``backends.blob_key``)

A version is written into a fresh staging folder (each file fsynced, then the folder), and
published by renaming the folder to ``adapters/<id>/v<n>`` (then fsyncing the parents): all files
of a version appear at once, and a rename onto a non-empty folder fails, which is the conditional
create. A single ``put`` writes a temporary file and hard-links it into place (``link`` fails if
the name exists). Reads never follow a link (``O_NOFOLLOW``); listing reports links and special
files as ``regular=False`` without following them, and empty folders as keys ending in ``/``.

One process owns a root (``single_owner``): orphans can be collected as soon as they are seen.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

from .backends import ADAPTERS_PREFIX, BlobExists, BlobInfo, BlobMissing
from .errors import Corrupt
from .fsutil import fsync_dir, read_bounded, remove_tree, write_durable
from .ids import adapter_dir, is_valid_id, parse_version_dir, version_dir

#: The primitives the store writes with; ``AdapterStore`` passes its own so crash tests can fault
#: one exact step (``write_durable`` of one file, the ``rename``, one ``fsync_dir``).
DEFAULT_FS = SimpleNamespace(write_durable=write_durable, fsync_dir=fsync_dir, rename=os.rename)


class LocalBlobStore:
    single_owner = True
    remote = False

    def __init__(self, root: Path | str, fs: object = DEFAULT_FS):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.adapters_root = self.root / "adapters"
        self.staging_root = self.root / "staging"
        self.adapters_root.mkdir(exist_ok=True)
        self.staging_root.mkdir(exist_ok=True)
        self.fs = fs

    def close(self) -> None:
        pass

    # ---- paths -------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The file of ``key``; its folders are checked to lie inside the root (no planted link
        redirects it: Corrupt). The last component is not resolved: reads refuse links."""
        parts = key.split("/")
        if len(parts) == 4 and key.startswith(ADAPTERS_PREFIX):
            version = parse_version_dir(parts[2])
            if version is not None and is_valid_id(parts[1]):
                return version_dir(self.adapters_root, parts[1], version) / parts[3]
        if any(p in ("", ".", "..") for p in parts):
            raise Corrupt("key", "invalid object key")
        path = self.root.joinpath(*parts)
        if path.parent.resolve() != self.root.joinpath(*parts[:-1]):
            raise Corrupt("key", "stored object path escapes the store")
        return path

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    # ---- objects -----------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        self._make_parents(path.parent)
        tmp = self.staging_root / f"put-{uuid.uuid4().hex}"
        self.fs.write_durable(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise BlobExists(key) from None
        finally:
            tmp.unlink(missing_ok=True)
        self.fs.fsync_dir(path.parent)

    def get(self, key: str, max_bytes: int) -> bytes:
        try:
            return read_bounded(self.path(key), max_bytes)
        except FileNotFoundError:
            raise BlobMissing(key) from None

    def exists(self, key: str) -> bool:
        return os.path.lexists(self.path(key))

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        """Remove the folder (or entry) ``prefix`` without following links, then the folders
        above it that became empty (an id folder whose last version went)."""
        parts = prefix.rstrip("/").split("/")
        if not parts or any(p in ("", ".", "..") for p in parts):
            raise Corrupt("key", "invalid object key")
        target = self.root.joinpath(*parts)
        if target.parent.resolve() != target.parent:
            raise Corrupt("key", "stored object path escapes the store")
        remove_tree(target)
        self._prune(target.parent)

    def _prune(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while they are empty, up to ``adapters/``."""
        while folder != self.adapters_root and folder.is_relative_to(self.adapters_root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        start = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix.strip("/") else self.root
        if not start.is_dir() or start.is_symlink():
            return
        yield from self._walk(start, prefix.rstrip("/") + "/" if prefix.strip("/") else "", top=True)

    def _walk(self, folder: Path, key_prefix: str, top: bool = False) -> Iterator[BlobInfo]:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        if not entries and not top:
            st = folder.lstat()
            yield BlobInfo(key_prefix, 0, st.st_mtime, regular=False)
        for entry in entries:
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key + "/")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield BlobInfo(key, st.st_size, st.st_mtime, regular=entry.is_file(follow_symlinks=False))

    # ---- versions ----------------------------------------------------------------------------
    def new_stage(self) -> Path:
        staging = self.staging_root / uuid.uuid4().hex
        os.mkdir(staging)
        return staging

    def stage(self, staged: Path, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            self.fs.write_durable(staged / name, data)
        self.fs.fsync_dir(staged)

    def publish(self, staged: Path, prefix: str) -> None:
        parts = prefix.rstrip("/").split("/")
        if len(parts) != 3 or parts[0] != "adapters" or parse_version_dir(parts[2]) is None:
            raise Corrupt("key", "invalid version prefix")
        id_dir = adapter_dir(self.adapters_root, parts[1])
        if not id_dir.is_dir():
            id_dir.mkdir()
            self.fs.fsync_dir(self.adapters_root)
        final = version_dir(self.adapters_root, parts[1], parse_version_dir(parts[2]))
        try:
            self.fs.rename(staged, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise BlobExists(prefix) from None
            raise
        self.fs.fsync_dir(id_dir)
        self.fs.fsync_dir(self.staging_root)

    def discard(self, staged: Path) -> None:
        remove_tree(staged)

    def sweep_staging(self) -> int:
        with os.scandir(self.staging_root) as it:
            leftovers = [Path(e.path) for e in it]
        for p in leftovers:
            remove_tree(p)
        return len(leftovers)

    def _make_parents(self, folder: Path) -> None:
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            f.mkdir(exist_ok=True)
            self.fs.fsync_dir(f.parent)
