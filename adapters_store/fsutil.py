"""Durable file operations: write + fsync, directory fsync, removal that never follows links."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import StorageFull

_FULL = {errno.ENOSPC, errno.EDQUOT}


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist), write all of ``data``, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created/renamed/removed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durable(path: Path, data: bytes) -> None:
    """Create or atomically replace ``path`` with ``data``: a temp file beside it (``<name>.tmp``,
    a stale one removed first), fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    write_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a file, symlink (not its target) or directory tree; missing is fine."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes``; returns ``max_bytes + 1`` bytes if larger.

    Links are not followed (``O_NOFOLLOW``): the store only reads files it wrote itself.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 8 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full_error() -> StorageFull:
    return StorageFull("storage", "not enough disk space to store the adapter; nothing was stored")
