"""Per-step adapter metadata and the merge policy (described in docs/engine.md).

Given the adapter key of every sequence in a step, ``StepPlanner.plan`` returns the binding the
wrapped linears apply:

1. No adapter in the step: no binding at all (plain model, plain cost).
2. Every sequence uses one adapter A, and A is *hot* (it filled ``merge_after_steps`` whole
   steps) or needs GEMMs on the fly (HUT rank > 1): A's merged weights are used for the whole
   step (created on first need if the merged budget allows): plain-model cost.
3. Otherwise, per adapter: "gemm"-cost adapters (HUT rank > 1) use merged weights grouped by
   adapter when the merged budget allows; every other adapter is applied on the fly from its
   device slot, rows grouped by slot pool.

The plan is built on the engine thread before a step's forward and reaches the wrapped linears
through a context variable (``adapted_linear.bind``: per thread, so a fine-tune's own binding never
mixes in). While a step's adapters and the residency epoch do not change (decode), the planner hands
back the same binding, so its per-layer groups are built once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

from .adapted_linear import MergedRows, PoolRows, ServeBinding
from .residency import Residency


class StepPlanner:
    def __init__(
        self,
        residency: Residency,
        device: torch.device,
        merge_after_steps: int = 4,
        kernels: object | None = None,
    ):
        self.residency = residency
        self.kernels = kernels  # fused CPU kernels for on-the-fly groups (server/kernels), or None
        self.device = device
        self.merge_after_steps = merge_after_steps
        self._whole_steps: dict[Hashable, int] = defaultdict(int)
        self._costs: dict[Hashable, str] = {}
        # Decode steps usually repeat the previous step's adapter list: reuse its binding while
        # residency is unchanged (same slots, same merged copies).
        self._last: tuple | None = None

    def _cost(self, key: Hashable) -> str:
        cost = self._costs.get(key)
        if cost is None:
            adapter = self.residency.get_host(key)
            method = adapter.method
            costs = {
                method.serving_cost(method.signature(adapter.config_for(p), *adapter.shapes[p]))
                for p in adapter.modules
            }
            cost = self._costs[key] = "gemm" if "gemm" in costs else "cheap"
        return cost

    def plan(
        self,
        keys: Sequence[Hashable | None],
        tokens_per_row: int,
        also_resident: Sequence[Hashable | None] = (),
    ) -> ServeBinding | None:
        """Binding for a step whose rows use ``keys``.

        ``also_resident``: adapters that must stay on the device beside this step's (the running
        batch, when this step prefills newcomers); if they cannot all fit, ``NoDeviceRoom`` (a
        ``RetryLater``) is raised before the model runs.
        """
        self.residency.apply_drops()
        present = list(dict.fromkeys(k for k in keys if k is not None))
        if not present:
            return None
        memo = (tuple(keys), tokens_per_row)
        single = len(present) == 1 and None not in keys
        if self._last is not None and self._last[0] == memo and self._last[1] == self.residency.epoch:
            binding = self._last[2]
            # A single adapter served on the fly may become hot: then plan again (and merge).
            if not (single and self.residency.merged_bytes > 0 and not binding.merged):
                return binding
        if len(self._costs) > 10_000:  # keys are (id, version): forget stale ones now and then
            self._costs.clear()
            self._whole_steps.clear()
        binding = self._plan(keys, present, tokens_per_row, also_resident)
        self._last = (memo, self.residency.epoch, binding)
        return binding

    def _plan(self, keys, present, tokens_per_row: int, also_resident=()) -> ServeBinding:
        res = self.residency
        merging = res.merged_bytes > 0
        if merging and len(present) == 1 and None not in keys:
            key = present[0]
            self._whole_steps[key] += 1
            hot = self._whole_steps[key] >= self.merge_after_steps or self._cost(key) == "gemm"
            entry = res.merged_entry(key, create=hot)
            if entry is not None:
                return ServeBinding(merged=[MergedRows(entry.weights, None)])

        rows_of: dict[Hashable, list[int]] = defaultdict(list)
        for b, k in enumerate(keys):
            if k is not None:
                rows_of[k].append(b)
        merged: list[MergedRows] = []
        on_the_fly = []
        for k in present:
            entry = res.merged_entry(k, create=merging and self._cost(k) == "gemm")
            if entry is not None:
                merged.append(MergedRows(entry.weights, self._token_rows(rows_of[k], tokens_per_row)))
            else:
                on_the_fly.append(k)
        # Phase 1: install everything this step needs (evictions happen only here; the step's
        # own adapters are protected by a reference while installing).
        others = [k for k in dict.fromkeys(also_resident) if k is not None and k not in rows_of]
        others = [k for k in others if not res.is_merged(k)]
        res.protected = set(on_the_fly) | set(others)
        try:
            entries = {k: res.device_entry(k) for k in on_the_fly}
            for k in others:
                res.device_entry(k)
        finally:
            res.protected = set()
        # Phase 2: slots are now stable; group rows by pool.
        by_pool: dict[int, tuple] = {}
        for k in on_the_fly:
            e = entries[k]
            rows = self._token_rows(rows_of[k], tokens_per_row)
            pool_rows, pool_slots, _ = by_pool.setdefault(id(e.pool), ([], [], e.pool))
            pool_rows.append(rows)
            pool_slots.append(torch.full_like(rows, e.slot))
        pools = [PoolRows(pool, torch.cat(r), torch.cat(s)) for r, s, pool in by_pool.values()]
        return ServeBinding(pools, merged, kernels=self.kernels)

    def _token_rows(self, seq_rows: list[int], t: int) -> torch.Tensor:
        b = torch.tensor(seq_rows, dtype=torch.long, device=self.device)
        return (b[:, None] * t + torch.arange(t, device=self.device)).reshape(-1)
