"""What the store does when it opens, so that after a crash at any point each adapter is either
whole (index row + blobs whose sha256 matches) or absent:

1. open the index. A damaged SQLite index (not a database, failed ``quick_check``, unreadable
   rows) is moved aside as ``index.sqlite3.corrupt-<time>`` and rebuilt from the blobs: the
   newest version of each id is re-validated and becomes a ``ready`` row, or a ``quarantined``
   one with the reason (tombstones are lost with the old file). Other indexes are opened as is;
2. remove what staging left behind (local blobs: uploads that never got renamed into place);
3. collect garbage (``gc.py``): every blob that no row needs (superseded, tombstoned, orphans of
   a crashed put older than the grace period, strays; links are never followed);
4. quarantine rows whose blobs are missing or whose weights have the wrong size (the full sha256
   check happens on every load). The rows are read *before* the blobs are listed: a row always
   commits after its blobs, so a row seen here has its blobs in the listing unless a newer
   version replaced it meanwhile (and then the quarantine, which names the version, does nothing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from .backends import ADAPTERS_PREFIX, BlobError, BlobInfo, BlobStore, blob_key
from .errors import StoreError
from .gc import collect_garbage, unit_of
from .ids import CONFIG_NAME, WEIGHTS_NAME
from .index import QUARANTINED, READY, AdapterRecord, Row, SqliteIndex, is_damage

log = logging.getLogger("facet.store")

# (adapter_id, version, {file name: BlobInfo}) -> a ready Row, or raises StoreError
Revalidate = Callable[[str, int, dict[str, BlobInfo]], Row]


@dataclass
class OpenReport:
    """What opening the store found and did (for logs and the readiness endpoint)."""

    index_rebuilt: bool = False
    staging_removed: int = 0
    orphans_removed: int = 0
    orphans_young: int = 0  # orphans kept for a later GC (younger than the grace period)
    quarantined: list[str] = field(default_factory=list)  # ids quarantined at this open

    @property
    def degraded(self) -> bool:
        return self.index_rebuilt or bool(self.quarantined)


def open_sqlite_index(
    root: Path, blobs: BlobStore, revalidate: Revalidate, base_model: str, report: OpenReport
) -> SqliteIndex:
    path = root / "index.sqlite3"
    index = SqliteIndex(path)
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
    index = SqliteIndex(path)
    index.open()
    rebuild(blobs, index, revalidate, base_model)
    report.index_rebuilt = True
    return index


def _newest_versions(blobs: BlobStore) -> dict[str, tuple[int, dict[str, BlobInfo]]]:
    """Each id's newest version that holds at least one object -> its objects by file name."""
    newest: dict[str, tuple[int, dict[str, BlobInfo]]] = {}
    for info in blobs.list(ADAPTERS_PREFIX):
        prefix, aid, version = unit_of(info.key)
        name = info.key[len(prefix) :]
        if aid is None or not name or "/" in name:
            continue
        best = newest.get(aid)
        if best is None or version > best[0]:
            newest[aid] = (version, {})
        if newest[aid][0] == version:
            newest[aid][1][name] = info
    return newest


def _broken_row(
    blobs: BlobStore, adapter_id: str, version: int, infos: dict[str, BlobInfo], base: str, reason: str
) -> Row:
    size, digest = 0, hashlib.sha256(b"").hexdigest()
    weights = infos.get(WEIGHTS_NAME)
    if weights is not None and weights.regular:
        try:
            data = blobs.get(weights.key, weights.size)
            size, digest = len(data), hashlib.sha256(data).hexdigest()
        except (OSError, BlobError):
            pass
    rec = AdapterRecord(adapter_id, version, "", {}, 0, size, digest, time.time(), QUARANTINED, reason)
    return Row(rec, "", base)


def rebuild(blobs: BlobStore, index: SqliteIndex, revalidate: Revalidate, base_model: str) -> None:
    for name, (version, infos) in sorted(_newest_versions(blobs).items()):
        try:
            row = revalidate(name, version, infos)
        except StoreError as e:
            row = _broken_row(
                blobs, name, version, infos, base_model, f"index rebuilt; stored files invalid ({e})"
            )
        except (OSError, BlobError) as e:
            reason = getattr(e, "strerror", None) or "missing"
            row = _broken_row(
                blobs, name, version, infos, base_model, f"index rebuilt; unreadable ({reason})"
            )
        index.allocate_version(name)  # counter row; commit() raises it to ``version``
        index.commit(row)
        log.warning("adapter index: rebuilt entry for %r (v%d, %s)", name, version, row.record.status)


def sweep(
    blobs: BlobStore,
    index,
    report: OpenReport,
    grace_s: float,
    lock_for: Callable[[str], AbstractContextManager] | None = None,
) -> None:
    """Steps 2 to 4 above."""
    report.staging_removed = blobs.sweep_staging()
    rows = index.all_rows()
    gc = collect_garbage(blobs, index, grace_s, lock_for)
    report.orphans_removed += gc.removed
    report.orphans_young = gc.young
    for row in rows:
        if row.record.status != READY:
            continue
        reason = _blobs_problem(gc.listing, row)
        aid = row.adapter_id
        if reason is not None and index.quarantine(aid, row.version, row.record.sha256, reason):
            report.quarantined.append(aid)
            log.error("adapter %r quarantined at open: %s", aid, reason)


def _blobs_problem(listing: dict[str, BlobInfo], row: Row) -> str | None:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        info = listing.get(blob_key(row.adapter_id, row.version, name))
        if info is None or not info.regular:
            return f"{name} is missing"
    if listing[blob_key(row.adapter_id, row.version, WEIGHTS_NAME)].size != row.record.nbytes:
        return f"{WEIGHTS_NAME} has the wrong size"
    return None
