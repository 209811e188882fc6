"""Garbage collection of blobs that no index row needs.

Objects are grouped in *units*: one version prefix ``adapters/<id>/v<n>/``, or one stray entry
(anything else under ``adapters/``: a file or link where a folder belongs, an invalid id, a folder
that is not a version). A unit is removed when:

* it is a stray: the store never writes one;
* its version is older than the id's current row (superseded: ``commit`` refuses an older
  version, so it can never become current again);
* the id has a tombstone at or above its version (deleted);
* no row points at it (a put that crashed between its blobs and its index row, or one still in
  flight) and its newest object is older than ``grace_s``.

The last rule is the only one that could race a writer, so it waits: a put writes its blobs and
commits its row within seconds, and ``grace_s`` (default 0 for a single-owner local store, whose
in-process writers hold the id lock that the collector also takes; 15 minutes for shared stores)
keeps young orphans for a later run. The row is read again under the id lock right before a unit
is removed, so a put of this process that committed meanwhile is never undone. Inside the current
version, entries other than the two files are strays too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from .backends import ADAPTERS_PREFIX, BlobInfo, BlobStore, Index
from .ids import FILE_NAMES, is_valid_id, parse_version_dir

log = logging.getLogger("facet.store")

SHARED_GRACE_S = 900.0


@dataclass
class GcReport:
    removed: int = 0  # units removed (version folders, stray entries)
    young: int = 0  # orphan versions kept until they are older than the grace period
    listing: dict[str, BlobInfo] = field(default_factory=dict)  # what is left, by key


@dataclass
class _Unit:
    prefix: str
    adapter_id: str | None = None  # None: a stray
    version: int = 0
    infos: list[BlobInfo] = field(default_factory=list)


def unit_of(key: str) -> tuple[str, str | None, int]:
    """``(unit prefix, adapter id or None for a stray, version)`` of a key under ``adapters/``."""
    parts = key[len(ADAPTERS_PREFIX) :].split("/")
    aid = parts[0]
    if len(parts) == 1 or not is_valid_id(aid) or parts[1] == "":
        return ADAPTERS_PREFIX + aid + ("/" if len(parts) > 1 else ""), None, 0
    version = parse_version_dir(parts[1])
    if version is None or len(parts) == 2:
        return f"{ADAPTERS_PREFIX}{aid}/{parts[1]}" + ("/" if len(parts) > 2 else ""), None, 0
    return f"{ADAPTERS_PREFIX}{aid}/{parts[1]}/", aid, version


def _group(blobs: BlobStore) -> dict[str, _Unit]:
    units: dict[str, _Unit] = {}
    for info in blobs.list(ADAPTERS_PREFIX):
        prefix, aid, version = unit_of(info.key)
        unit = units.setdefault(prefix, _Unit(prefix, aid, version))
        unit.infos.append(info)
    return units


def collect_garbage(
    blobs: BlobStore,
    index: Index,
    grace_s: float,
    lock_for: Callable[[str], AbstractContextManager] | None = None,
    now: float | None = None,
) -> GcReport:
    """Remove every unit the rules above allow; return what was done and what is left."""
    now = time.time() if now is None else now
    lock_for = lock_for or (lambda aid: contextlib.nullcontext())
    tombs = index.tombstones()
    report = GcReport()
    for unit in _group(blobs).values():
        if unit.adapter_id is None:
            blobs.delete_prefix(unit.prefix)
            report.removed += 1
            continue
        with lock_for(unit.adapter_id):
            row = index.get(unit.adapter_id)
            if row is not None and row.version == unit.version:
                _keep_current(blobs, unit, report)
                continue
            if row is not None and row.version > unit.version:
                why = "superseded"
            elif tombs.get(unit.adapter_id, 0) >= unit.version:
                why = "deleted"
            elif now - max(i.mtime for i in unit.infos) >= grace_s:
                why = "never committed"
            else:
                report.young += 1
                report.listing.update((i.key, i) for i in unit.infos)
                continue
            blobs.delete_prefix(unit.prefix)
            report.removed += 1
            log.info("store gc: removed %s (%s)", unit.prefix, why)
    return report


def _keep_current(blobs: BlobStore, unit: _Unit, report: GcReport) -> None:
    strays: set[str] = set()
    for info in unit.infos:
        name = info.key[len(unit.prefix) :]
        if name in FILE_NAMES:
            report.listing[info.key] = info
        elif name:  # "" is the folder itself, empty: the row's check quarantines it
            strays.add(unit.prefix + name.split("/")[0] + ("/" if "/" in name else ""))
    for stray in strays:
        blobs.delete_prefix(stray)
        report.removed += 1
