"""What the store does when it opens, so that after a crash at any point each adapter is either
whole (index row + files whose sha256 matches) or absent:

1. open the SQLite index; if it is damaged (not a database, failed ``quick_check``, unreadable
   rows) move it aside as ``index.sqlite3.corrupt-<time>`` and rebuild it from the files on disk:
   the newest version folder of each id is re-validated and becomes a ``ready`` row, or a
   ``quarantined`` one with the reason;
2. remove everything under ``staging/`` (uploads that never got renamed into place);
3. under ``adapters/`` remove every entry that no index row points to: ids without a row, version
   folders other than the row's, stray files and symlinks (never followed);
4. quarantine rows whose files are missing or whose weights file has the wrong size (the full
   sha256 check happens on every load).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StoreError
from .fsutil import remove_tree
from .ids import CONFIG_NAME, WEIGHTS_NAME, is_valid_id, parse_version_dir, version_dir_name
from .index import QUARANTINED, READY, AdapterRecord, Index, Row, is_damage

log = logging.getLogger("facet.store")

# (adapter_id, version folder) -> a ready Row, or raises StoreError
Revalidate = Callable[[str, int, Path], Row]


@dataclass
class OpenReport:
    """What opening the store found and did (for logs and the readiness endpoint)."""

    index_rebuilt: bool = False
    staging_removed: int = 0
    orphans_removed: int = 0
    quarantined: list[str] = field(default_factory=list)  # ids quarantined at this open

    @property
    def degraded(self) -> bool:
        return self.index_rebuilt or bool(self.quarantined)


def open_index(root: Path, revalidate: Revalidate, base_model: str, report: OpenReport) -> Index:
    path = root / "index.sqlite3"
    index = Index(path)
    try:
        index.open()
        return index
    except sqlite3.DatabaseError as e:
        if not is_damage(e):
            raise  # e.g. "database is locked": never move a healthy index aside
        log.error("adapter index is damaged; moving it aside and rebuilding it from the stored files")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        src = root / f"index.sqlite3{suffix}"
        if src.exists():
            os.replace(src, root / f"index.sqlite3.corrupt-{stamp}{suffix}")
    index = Index(path)
    index.open()
    rebuild(root / "adapters", index, revalidate, base_model)
    report.index_rebuilt = True
    return index


def _newest_version(id_dir: Path) -> tuple[int, Path] | None:
    best: tuple[int, Path] | None = None
    with os.scandir(id_dir) as it:
        for entry in it:
            v = parse_version_dir(entry.name)
            if v is not None and entry.is_dir(follow_symlinks=False) and (best is None or v > best[0]):
                best = (v, Path(entry.path))
    return best


def _broken_row(adapter_id: str, version: int, folder: Path, base_model: str, reason: str) -> Row:
    weights = folder / WEIGHTS_NAME
    size, digest = 0, hashlib.sha256(b"").hexdigest()
    try:
        if weights.is_file() and not weights.is_symlink():
            with open(weights, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                size = f.tell()
    except OSError:
        pass
    rec = AdapterRecord(adapter_id, version, "", {}, 0, size, digest, time.time(), QUARANTINED, reason)
    return Row(rec, "", base_model)


def rebuild(adapters_root: Path, index: Index, revalidate: Revalidate, base_model: str) -> None:
    if not adapters_root.is_dir():
        return
    with os.scandir(adapters_root) as it:
        entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    for name, is_dir in entries:
        if not is_dir or not is_valid_id(name):
            continue
        newest = _newest_version(adapters_root / name)
        if newest is None:
            continue
        version, folder = newest
        try:
            row = revalidate(name, version, folder)
        except StoreError as e:
            row = _broken_row(name, version, folder, base_model, f"index rebuilt; stored files invalid ({e})")
        except OSError as e:
            row = _broken_row(name, version, folder, base_model, f"index rebuilt; unreadable ({e.strerror})")
        index.allocate_version(name)  # counter row; commit() raises it to ``version``
        index.commit(row)
        log.warning("adapter index: rebuilt entry for %r (v%d, %s)", name, version, row.record.status)


def sweep(root: Path, index: Index, report: OpenReport) -> None:
    staging = root / "staging"
    with os.scandir(staging) as it:
        leftovers = [Path(e.path) for e in it]
    for p in leftovers:
        remove_tree(p)
    report.staging_removed = len(leftovers)

    rows = {r.adapter_id: r for r in index.all_rows()}
    adapters_root = root / "adapters"
    with os.scandir(adapters_root) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        path = adapters_root / name
        row = rows.get(name) if is_dir and is_valid_id(name) else None
        if row is None:
            remove_tree(path)
            report.orphans_removed += 1
            continue
        keep = version_dir_name(row.version)
        with os.scandir(path) as it:
            stale = [e.name for e in it if e.name != keep or not e.is_dir(follow_symlinks=False)]
        for entry in stale:
            remove_tree(path / entry)
            report.orphans_removed += 1

    for aid, row in rows.items():
        if row.record.status != READY:
            continue
        reason = _files_problem(adapters_root / aid / version_dir_name(row.version), row)
        if reason is not None and index.quarantine(aid, row.version, row.record.sha256, reason):
            report.quarantined.append(aid)
            log.error("adapter %r quarantined at open: %s", aid, reason)


def _files_problem(folder: Path, row: Row) -> str | None:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        p = folder / name
        if p.is_symlink() or not p.is_file():
            return f"{name} is missing"
    if (folder / WEIGHTS_NAME).stat().st_size != row.record.nbytes:
        return f"{WEIGHTS_NAME} has the wrong size"
    return None
