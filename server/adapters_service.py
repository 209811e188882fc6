"""The one owner of an adapter's lifecycle: put, delete, pin, unpin and describe.

Storing an adapter and the engine's copies of it are two halves of one operation: after a new
version is stored the engine must forget the version it replaced (requests already running keep
theirs until they finish), and after a delete it must forget the deleted one and its pin. Routes
(``server.api.adapters``) and the fine-tune runner (``server.jobs.runner``) both go through this
service, so that protocol is written once.

The replaced version is the one the store's index commit replaced (``AdapterStore.put_replacing``),
not one read before the put: two puts racing on one id then forget each superseded version
exactly once, and never the one that is current.

The engine is anything with ``forget(id, version)``, ``pin(id)``, ``unpin(id)`` and a
``residency`` with ``snapshot(key)``: today the local ``Engine``; a remote replica's proxy can
stand in for it (see docs/scale-out.md, "Composition root").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_store.index import AdapterRecord

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore
    from server.engine.engine import Engine


@dataclass(frozen=True)
class AdapterView:
    """A stored record and where it is resident, from one residency snapshot."""

    record: AdapterRecord
    tiers: tuple[str, ...]  # engine tiers: host, device, merged
    pinned: bool
    on_disk: bool = True

    def to_json(self) -> dict:
        """The API's ``AdapterInfo``: the record's fields, ``residency`` (``disk`` first when the
        store holds it) and ``pinned``."""
        return {
            **dataclasses.asdict(self.record),
            "residency": (["disk"] if self.on_disk else []) + list(self.tiers),
            "pinned": self.pinned,
        }


class AdapterService:
    def __init__(self, store: AdapterStore, engine: Engine):
        self.store = store
        self.engine = engine

    # ---- writes ------------------------------------------------------------------------------
    def put(self, adapter_id: str, config_bytes: bytes, weights_file: Path | bytes) -> AdapterRecord:
        """Store a new version, then make the engine forget the version it replaced. The store's
        errors (422, 413, 409, 507) pass through; nothing is forgotten when the put fails."""
        record, replaced = self.store.put_replacing(adapter_id, config_bytes, weights_file)
        if replaced is not None and replaced != record.version:
            self.engine.forget(record.adapter_id, replaced)
        return record

    def delete(self, adapter_id: str) -> AdapterView:
        """Remove the adapter (``NotFound`` if absent); the engine drops its pin and forgets the
        version. The view shows what is still resident (in use by running requests)."""
        record = self.store.delete(adapter_id)
        self.engine.unpin(adapter_id)
        self.engine.forget(record.adapter_id, record.version)
        return self.describe(record, on_disk=False)

    def pin(self, adapter_id: str) -> AdapterView:
        """Keep every version of the adapter resident once loaded, until unpinned or deleted."""
        record = self.store.get(adapter_id)  # NotFound: nothing is pinned
        self.engine.pin(adapter_id)
        return self.describe(record)

    def unpin(self, adapter_id: str) -> AdapterView:
        record = self.store.get(adapter_id)
        self.engine.unpin(adapter_id)
        return self.describe(record)

    # ---- reads -------------------------------------------------------------------------------
    def describe(self, record: AdapterRecord, *, on_disk: bool = True) -> AdapterView:
        snap = self.engine.residency.snapshot((record.adapter_id, record.version))
        return AdapterView(record, snap.tiers, snap.pinned, on_disk)

    def get(self, adapter_id: str) -> AdapterView:
        return self.describe(self.store.get(adapter_id))

    def list(self, offset: int, limit: int) -> tuple[list[AdapterView], int]:
        records, total = self.store.list(offset, limit)
        return [self.describe(r) for r in records], total
