"""The serving engine: one resident base model, many adapters, one forward pass per step.

    engine = Engine(load_base_model(settings), settings)
    engine.add_adapter("my-lora", Adapter.load(folder, engine.base.module_shapes))
    engine.start()                       # background engine thread
    req = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32), adapter_id="my-lora")
    for event in req.sink: ...           # TokenEvent ... FinishEvent

Adapters are registered in memory here (``add_adapter``) or resolved through an injected
``source`` (the adapter store). Requests pin the *version* current when they are submitted: the
generator's adapter key is ``(adapter_id, version)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from server.methods import Adapter
from server.settings import Settings

from . import threads
from .adapted_linear import bind
from .batching import BatchingBase
from .generator import Generator, hf_forward
from .kv_batch import growing_cache
from .loader import BaseModel
from .paged.build import build_kv, paged_forward
from .paged.generator import PagedGenerator
from .paged.static import StaticDecode
from .policy import StepPlanner
from .requests import EventSink, GenerationRequest, SamplingParams
from .residency import Residency

AdapterKey = tuple[str, int]


class UnknownAdapter(KeyError):
    pass


class Engine:
    def __init__(
        self,
        base: BaseModel,
        settings: Settings,
        source: Callable[[AdapterKey], Adapter] | None = None,
        current_version: Callable[[str], int | None] | None = None,
    ):
        self.base = base
        self.settings = settings
        self._registry: dict[str, tuple[int, Adapter]] = {}
        self._source = source or self._from_registry
        self._current_version = current_version or self._registry_version
        self.residency = Residency(
            base.modules,
            self._source,
            device_bytes=settings.device_adapter_bytes,
            host_bytes=settings.host_adapter_bytes,
            merged_bytes=settings.merged_cache_bytes,
        )
        for adapter_id in settings.pinned_adapters:
            self.pin(adapter_id)
        kernels = None
        if settings.cpu_kernels and base.device.type == "cpu":
            from server import kernels as cpu_kernels

            kernels = cpu_kernels.load(settings.kernels_build_dir)
        self.planner = StepPlanner(self.residency, base.device, settings.merge_after_steps, kernels)
        plain = hf_forward(base.model)

        def forward(input_ids, attention_mask, position_ids, past_key_values, adapter_keys, **kw):
            running = self.generator.running_adapter_keys
            binding = self.planner.plan(adapter_keys, input_ids.shape[1], also_resident=running)
            with bind(binding):
                return plain(input_ids, attention_mask, position_ids, past_key_values, adapter_keys, **kw)

        max_len = getattr(base.model.config, "max_position_embeddings", None)
        common = dict(
            max_batch_size=settings.max_batch_size,
            max_tokens_per_step=settings.max_tokens_per_step,
            device=base.device,
            max_seq_len=max_len,
            housekeeping=self.residency.apply_drops,
        )
        paged = build_kv(base.model, settings, base.device) if settings.kv_cache == "paged" else None
        self.static_decode: StaticDecode | None = None  # base-only decode steps in static shapes
        self.generator: BatchingBase
        if paged is not None:
            kv, pool = paged
            if settings.static_decode != "off":
                compiled = settings.static_decode == "compiled"
                self.static_decode = StaticDecode(
                    base.model, kv, settings.max_batch_size, base.device, compile=compiled
                )
                self.static_decode.warm_up()
            self.generator = PagedGenerator(
                paged_forward(base.model, self.planner, bind, self.static_decode),
                base.tokenizer,
                base.eos_token_ids,
                kv=kv,
                pool=pool,
                kv_budget_bytes=settings.kv_cache_bytes,
                prefill_itl_factor=settings.prefill_itl_factor,
                prefill_max_share=settings.prefill_max_share,
                prefill_itl_floor_s=settings.prefill_itl_floor_ms / 1000.0,
                **common,
            )
        else:
            self.generator = Generator(
                forward,
                base.tokenizer,
                base.eos_token_ids,
                cache_factory=lambda: growing_cache(base.model.config),  # no per-step copy of the cache
                **common,
            )
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- adapters registered in memory (tests, benchmarks, offline use) ----------------------
    def add_adapter(self, adapter_id: str, adapter: Adapter) -> AdapterKey:
        version = self._registry.get(adapter_id, (0, None))[0] + 1
        old = self._registry.get(adapter_id)
        self._registry[adapter_id] = (version, adapter)
        if old is not None:
            self.forget(adapter_id, old[0])
        return (adapter_id, version)

    def _from_registry(self, key: AdapterKey) -> Adapter:
        entry = self._registry.get(key[0])
        if entry is None or entry[0] != key[1]:
            raise UnknownAdapter(key[0])
        return entry[1]

    def _registry_version(self, adapter_id: str) -> int | None:
        entry = self._registry.get(adapter_id)
        return None if entry is None else entry[0]

    def resolve(self, adapter_id: str | None) -> AdapterKey | None:
        """The key (id, current version) a new request for ``adapter_id`` will use."""
        if adapter_id is None:
            return None
        version = self._current_version(adapter_id)
        if version is None:
            raise UnknownAdapter(adapter_id)
        return (adapter_id, version)

    # ---- requests ----------------------------------------------------------------------------
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        sink: EventSink | None = None,
        reserved: bool = False,
    ) -> GenerationRequest:
        """Resolve and load the adapter, then queue the request. ``reserved``: the caller holds a
        queue place (``generator.reserve``); it is used by the submit, and given back on failure."""
        return self.submit_many([(prompt_token_ids, params, sink)], adapter_id, reserved)[0]

    def submit_many(
        self,
        rows: list[tuple[list[int], SamplingParams | None, EventSink | None]],
        adapter_id: str | None = None,
        reserved: bool = False,
    ) -> list[GenerationRequest]:
        """``submit`` for several requests on one adapter version, queued together: they are
        admitted in one step (room permitting), where rows with the same prompt are prefilled once
        (``n`` samples of a prompt). ``reserved``: one queue place per row."""
        key, held = None, 0
        try:
            if adapter_id is not None:
                key = self._hold(adapter_id)  # resolves and loads once: one version for all rows
                held = 1
                for _ in rows[1:]:
                    self.residency.acquire(key)  # each request releases its own reference
                    held += 1
            reqs = [
                GenerationRequest(
                    prompt_token_ids=list(ids),
                    params=params or SamplingParams(),
                    adapter_key=key,
                    **({} if sink is None else {"sink": sink}),
                )
                for ids, params, sink in rows
            ]
        except BaseException:
            for _ in range(held):
                self.residency.release(key)
            if reserved:
                for _ in rows:
                    self.generator.unreserve()
            raise
        if key is not None:
            for req in reqs:
                req.on_finish.append(lambda: self.residency.release(key))
        self.generator.submit_many(reqs, reserved=reserved)
        return reqs

    def _hold(self, adapter_id: str, tries: int = 3) -> AdapterKey:
        """Resolve ``adapter_id``, take a reference on that version and load its host copy.

        The request holds its version until it finishes: a delete or re-upload meanwhile never
        changes what it runs, and memory is freed after the last user ends. Loading happens
        once, before queueing, so errors reach the caller. A re-upload (or delete) landing
        between the resolve and the load removes the resolved version: resolve again rather
        than fail a request for an adapter that exists (UnknownAdapter once it is deleted).
        """
        key = self.resolve(adapter_id)
        for attempt in range(tries):
            self.residency.acquire(key)
            try:
                self.residency.get_host(key)
                return key
            except BaseException as exc:
                self.residency.release(key)
                if not isinstance(exc, Exception) or attempt == tries - 1:
                    raise
                newer = self.resolve(adapter_id)
                if newer == key:
                    raise
                key = newer
        raise AssertionError("unreachable")

    def forget(self, adapter_id: str, version: int) -> None:
        """The store deleted or replaced this version: no new request gets it; memory is freed
        once the requests still using it end."""
        self.residency.forget((adapter_id, version))
        if isinstance(self.generator, PagedGenerator):  # its cached KV blocks never match again
            self.generator.forget_prefix((adapter_id, version))
        self.generator.wake()

    # ---- engine thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="facet-engine")
        self._thread.start()

    def _run(self) -> None:
        """The engine thread: the one long-lived thread with intra-op parallelism (``threads``)."""
        threads.parallel()
        self.generator.run_forever(self._stop)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self.generator.wake()
        self._thread.join()
        self._thread = None

    def kv_stats(self):
        """The paged KV cache's ``KVStats`` (None on the padded cache)."""
        gen = self.generator
        return gen.kv_stats() if isinstance(gen, PagedGenerator) else None

    def pin(self, adapter_id: str) -> None:
        """Keep every version of ``adapter_id`` resident once loaded (never evicted) until unpinned."""
        self.residency.pin(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.residency.unpin(adapter_id)
