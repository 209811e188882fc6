"""Device-side slot tables.

A *pool* holds the device copies of every resident adapter that shares one layout: the same
family and the same per-module signatures (e.g. "LoRA r=8 on all 7 projections"). For each
adapted module path the pool keeps one stacked tensor per prepared name, ``[capacity, ...]``;
adapter number ``slot`` lives at index ``slot`` of every one of them. Because every adapter in
a pool has the same layout, one ``(rows, slots)`` pair per pool serves all layers of a step.

Pools grow by doubling and shrink when a quarter full; removal moves the last slot into the
hole (the caller is told which adapter moved). Only the engine thread touches pools, between
forward passes.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from server.methods import AdapterMethod

Prepared = dict[str, dict[str, torch.Tensor]]  # module path -> name -> per-slot tensor


class SlotPool:
    def __init__(self, key: Hashable, method: AdapterMethod, sigs: dict[str, Hashable], example: Prepared):
        self.key = key
        self.method = method
        self.sigs = sigs
        self._shapes = {
            p: {n: (t.shape, t.dtype, t.device) for n, t in ts.items()} for p, ts in example.items()
        }
        self.bytes_per_slot = sum(
            t.numel() * t.element_size() for ts in example.values() for t in ts.values()
        )
        self.capacity = 0
        self.owners: list[Hashable] = []  # owners[slot] = adapter key
        self.tables: dict[str, dict[str, torch.Tensor]] = {}
        self._resize(1)

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_slot

    def bytes_after_add(self) -> int:
        """Pool bytes if one more adapter were added (may double the capacity)."""
        cap = self.capacity if len(self.owners) < self.capacity else self.capacity * 2
        return cap * self.bytes_per_slot

    # The tables are made in inference mode (engine steps); every in-place change must be too, also
    # when it runs outside a step (freeing a forgotten adapter's slot while idle).
    @torch.inference_mode()
    def _resize(self, capacity: int) -> None:
        new = {}
        n = len(self.owners)
        for path, shapes in self._shapes.items():
            new[path] = {}
            for name, (shape, dtype, device) in shapes.items():
                t = torch.zeros((capacity, *shape), dtype=dtype, device=device)
                if n:
                    t[:n].copy_(self.tables[path][name][:n])
                new[path][name] = t
        self.tables = new
        self.capacity = capacity

    @torch.no_grad()
    @torch.inference_mode()
    def add(self, owner: Hashable, prepared: Prepared) -> int:
        if len(self.owners) == self.capacity:
            self._resize(self.capacity * 2)
        slot = len(self.owners)
        for path, tensors in prepared.items():
            for name, t in tensors.items():
                self.tables[path][name][slot].copy_(t)
        self.owners.append(owner)
        return slot

    @torch.no_grad()
    @torch.inference_mode()
    def remove(self, slot: int) -> Hashable | None:
        """Free ``slot``. Returns the owner that moved into it (now at ``slot``), if any."""
        last = len(self.owners) - 1
        moved = None
        if slot != last:
            for tensors in self.tables.values():
                for t in tensors.values():
                    t[slot].copy_(t[last])
            moved = self.owners[last]
            self.owners[slot] = moved
        self.owners.pop()
        if self.capacity > 1 and len(self.owners) <= self.capacity // 4:
            self._resize(max(1, self.capacity // 2))
        return moved
