"""Where each adapter lives: disk (the store) -> host LRU -> device slot pools, plus merged copies.

* Host tier: ``Adapter`` objects (CPU tensors) in an LRU bounded by bytes. ``get_host`` is
  thread-safe and single-flight: 50 concurrent first requests for one adapter load it once.
* Device tier: slot pools (``slots.py``) bounded by ``device_bytes``. Installing an adapter
  evicts least-recently-used device adapters that are neither pinned nor in use by a running
  request. Eviction removes the slot and shrinks the pool, so memory is really freed.
* Merged tier: full copies ``W'`` of every targeted weight for hot adapters, in an LRU bounded
  by ``merged_bytes`` (see docs/engine.md for the policy).

Only the engine thread calls the device/merged methods (between forward passes). Keys are
``(adapter_id, version)`` so a re-upload never aliases the old version.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from server.methods import Adapter, check_finite_tables

from .adapted_linear import AdaptedLinear
from .requests import RetryLater
from .slots import SlotPool

AdapterKey = Hashable


@dataclass
class DeviceEntry:
    pool: SlotPool
    slot: int
    family: str


@dataclass
class MergedEntry:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    nbytes: int


@dataclass(frozen=True)
class ResidencySnapshot:
    """Where one adapter version is resident and whether its id is pinned, read together."""

    tiers: tuple[str, ...]  # of "host", "device", "merged", in that order
    pinned: bool


@dataclass
class ResidencyStats:
    loads: int = 0  # disk -> host
    host_hits: int = 0
    host_misses: int = 0
    device_installs: int = 0
    device_hits: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {"host": 0, "device": 0, "merged": 0})
    merges: int = 0
    merged_hits: int = 0
    load_seconds: list[float] = field(default_factory=list)


class NoDeviceRoom(RetryLater):
    """Every resident adapter is pinned or in use; the request must wait."""


class Residency:
    def __init__(
        self,
        modules: dict[str, AdaptedLinear],
        source: Callable[[AdapterKey], Adapter],
        device_bytes: int,
        host_bytes: int,
        merged_bytes: int = 0,
    ):
        self.modules = modules
        self.source = source
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        self.merged_bytes = merged_bytes
        self.stats = ResidencyStats()
        self._host: OrderedDict[AdapterKey, Adapter] = OrderedDict()
        self._host_lock = threading.Lock()
        self._inflight: dict[AdapterKey, Future] = {}
        self._device: OrderedDict[AdapterKey, DeviceEntry] = OrderedDict()
        self._pools: dict[Hashable, SlotPool] = {}
        self._merged: OrderedDict[AdapterKey, MergedEntry] = OrderedDict()
        self._refs: dict[AdapterKey, int] = {}
        self._refs_lock = threading.Lock()
        self._forgotten: set[AdapterKey] = set()  # deleted/replaced, dropped when the last user ends
        self._drop_queue: list[AdapterKey] = []  # device/merged drops for the engine thread
        self.pinned_ids: set[str] = set()  # every version of these adapter ids (keys (id, version))
        self.protected: set[AdapterKey] = set()  # the current step's adapters (set by the planner)
        self.epoch = 0  # bumped whenever a slot or merged copy appears, moves or disappears

    # ---- host tier (any thread) ------------------------------------------------------------
    def get_host(self, key: AdapterKey) -> Adapter:
        import time

        with self._host_lock:
            if key in self._host:
                self._host.move_to_end(key)
                self.stats.host_hits += 1
                return self._host[key]
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._inflight[key] = Future()
                self.stats.host_misses += 1
        if not owner:
            return fut.result()
        try:
            t0 = time.perf_counter()
            adapter = self.source(key)
            self.stats.load_seconds.append(time.perf_counter() - t0)
            self.stats.loads += 1
        except BaseException as e:
            with self._host_lock:
                del self._inflight[key]
            fut.set_exception(e)
            raise
        with self._host_lock:
            self._host[key] = adapter
            del self._inflight[key]
            self._evict_host()
        fut.set_result(adapter)
        return adapter

    def is_pinned(self, key: AdapterKey) -> bool:
        return isinstance(key, tuple) and bool(key) and key[0] in self.pinned_ids

    def pin(self, adapter_id: str) -> None:
        """Keep every version of ``adapter_id`` once loaded. Under the host lock, so a host
        eviction or a ``snapshot`` sees the pin either wholly before or wholly after."""
        with self._host_lock:
            self.pinned_ids.add(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._host_lock:
            self.pinned_ids.discard(adapter_id)

    def _evict_host(self) -> None:
        total = sum(a.nbytes() for a in self._host.values())
        for key in list(self._host):
            if total <= self.host_bytes or len(self._host) <= 1:
                break
            if self.is_pinned(key) or self._refs.get(key):
                continue
            total -= self._host.pop(key).nbytes()
            self.stats.evictions["host"] += 1

    def forget(self, key: AdapterKey) -> None:
        """``key`` was deleted or replaced: drop every copy now, or when its last request ends."""
        with self._refs_lock:
            if self._refs.get(key):
                self._forgotten.add(key)
                return
        self._drop_all(key)

    def _drop_all(self, key: AdapterKey) -> None:
        with self._host_lock:
            self._host.pop(key, None)
            self._drop_queue.append(key)

    def apply_drops(self) -> None:
        """Engine thread: free the device slots and merged copies of forgotten adapters."""
        with self._host_lock:
            keys, self._drop_queue = self._drop_queue, []
        for key in keys:
            self._drop_device(key)
            if self._merged.pop(key, None) is not None:
                self.epoch += 1

    # ---- references held by requests (any thread) --------------------------------------------
    def acquire(self, key: AdapterKey) -> None:
        with self._refs_lock:
            self._refs[key] = self._refs.get(key, 0) + 1

    def release(self, key: AdapterKey) -> None:
        with self._refs_lock:
            n = self._refs.get(key, 0) - 1
            if n > 0:
                self._refs[key] = n
                return
            self._refs.pop(key, None)
            drop = key in self._forgotten
            self._forgotten.discard(key)
        if drop:
            self._drop_all(key)

    # ---- device tier (engine thread) --------------------------------------------------------
    @property
    def device_used(self) -> int:
        return sum(p.nbytes for p in self._pools.values())

    def device_entry(self, key: AdapterKey) -> DeviceEntry:
        """The device slot of ``key``, installing it (and evicting LRU adapters) if needed."""
        entry = self._device.get(key)
        if entry is not None:
            self._device.move_to_end(key)
            self.stats.device_hits += 1
            return entry
        adapter = self.get_host(key)
        prepared, sigs = self._prepare(adapter)
        layout = (adapter.family, tuple(sorted(sigs.items())))
        self._make_room(layout, adapter, prepared, sigs, keep=key)
        pool = self._pools.get(layout)
        if pool is None:
            pool = self._pools[layout] = SlotPool(layout, adapter.method, sigs, prepared)
        slot = pool.add(key, prepared)
        self.epoch += 1
        entry = self._device[key] = DeviceEntry(pool, slot, adapter.family)
        self.stats.device_installs += 1
        return entry

    @torch.no_grad()
    def _prepare(self, adapter: Adapter):
        prepared, sigs = {}, {}
        for path, params in adapter.modules.items():
            base = self.modules[path].base
            w = base.weight
            p = {
                k: v.to(w.device, torch.float32 if v.is_floating_point() else v.dtype)
                for k, v in params.items()
            }
            extra = {}
            if adapter.method.prepare_uses_bias:  # IA3: PEFT scales the bias with the output
                extra["bias"] = None if base.bias is None else base.bias.float()
            out = adapter.method.prepare(adapter.config_for(path), p, w.float(), **extra)
            prepared[path] = {
                k: (v.to(w.dtype) if v.is_floating_point() else v).contiguous() for k, v in out.items()
            }
            # Second line of defence (the store checked the same tables at upload and load): a
            # non-finite table never reaches a slot pool.
            check_finite_tables(path, list(params), prepared[path], w.dtype)
            sigs[path] = adapter.method.signature(adapter.config_for(path), w.shape[0], w.shape[1])
        return prepared, sigs

    def _make_room(self, layout, adapter: Adapter, prepared, sigs, keep: AdapterKey) -> None:
        """Evict LRU adapters (not pinned, not in use) one at a time until the new one fits.

        The space needed is recomputed after every eviction: evicting from the adapter's own pool
        can free a slot (no growth needed) or even delete the pool.
        """
        while True:
            pool = self._pools.get(layout)
            if pool is None:
                needed = SlotPool(layout, adapter.method, sigs, prepared).nbytes
            else:
                needed = pool.bytes_after_add() - pool.nbytes
            if self.device_used + needed <= self.device_bytes:
                return
            victim = next(
                (k for k in self._device if k != keep and not self.is_pinned(k) and k not in self.protected),
                None,
            )
            if victim is None:
                raise NoDeviceRoom(
                    f"device adapter budget {self.device_bytes} B is full of pinned/in-use adapters"
                )
            self._drop_device(victim)
            self.stats.evictions["device"] += 1

    def _drop_device(self, key: AdapterKey) -> None:
        entry = self._device.pop(key, None)
        if entry is None:
            return
        self.epoch += 1
        moved = entry.pool.remove(entry.slot)
        if moved is not None:
            self._device[moved].slot = entry.slot
        if len(entry.pool) == 0:
            del self._pools[entry.pool.key]

    # ---- merged tier (engine thread) --------------------------------------------------------
    def merged_entry(self, key: AdapterKey, create: bool) -> MergedEntry | None:
        entry = self._merged.get(key)
        if entry is not None:
            self._merged.move_to_end(key)
            self.stats.merged_hits += 1
            return entry
        if not create:
            return None
        adapter = self.get_host(key)
        weights, nbytes = {}, 0
        with torch.no_grad():
            for path, params in adapter.modules.items():
                base = self.modules[path].base
                w = base.weight
                p = {
                    k: v.to(w.device, torch.float32 if v.is_floating_point() else v.dtype)
                    for k, v in params.items()
                }
                b = None if base.bias is None else base.bias.float()
                w2, b2 = adapter.method.merged_weight(adapter.config_for(path), p, w.float(), b)
                w2 = w2.to(w.dtype).contiguous()
                b2 = None if b2 is None else b2.to(w.dtype)
                weights[path] = (w2, b2)
                nbytes += w2.numel() * w2.element_size() + (
                    0 if b2 is None else b2.numel() * b2.element_size()
                )
        if nbytes > self.merged_bytes:
            return None
        while self._merged and sum(e.nbytes for e in self._merged.values()) + nbytes > self.merged_bytes:
            self._merged.popitem(last=False)
            self.stats.evictions["merged"] += 1
            self.epoch += 1
        entry = self._merged[key] = MergedEntry(weights, nbytes)
        self.epoch += 1
        self.stats.merges += 1
        return entry

    # ---- introspection ---------------------------------------------------------------------
    def is_merged(self, key: AdapterKey) -> bool:
        return key in self._merged

    def tier_of(self, key: AdapterKey) -> list[str]:
        tiers = []
        if key in self._host:
            tiers.append("host")
        if key in self._device:
            tiers.append("device")
        if key in self._merged:
            tiers.append("merged")
        return tiers

    def snapshot(self, key: AdapterKey) -> ResidencySnapshot:
        """Tiers and pin of ``key`` read under the host lock, which host loads, host evictions,
        ``forget`` and pins take: no answer mixes a state from before one of them with one from
        after. Device and merged copies change only on the engine thread; each membership test
        is a single dict lookup there."""
        with self._host_lock:
            return ResidencySnapshot(tuple(self.tier_of(key)), self.is_pinned(key))

    def resident_counts(self) -> dict[tuple[str, str], int]:
        """(tier, family) -> number of adapters."""
        counts: dict[tuple[str, str], int] = {}
        with self._host_lock:
            for a in self._host.values():
                counts[("host", a.family)] = counts.get(("host", a.family), 0) + 1
        for e in self._device.values():
            counts[("device", e.family)] = counts.get(("device", e.family), 0) + 1
        for k in self._merged:
            fam = self._host[k].family if k in self._host else "unknown"
            counts[("merged", fam)] = counts.get(("merged", fam), 0) + 1
        return counts
