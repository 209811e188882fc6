"""KV blocks: allocation, reference counts and the adapter-aware prefix cache.

The KV cache is ``num_blocks`` fixed-size blocks of ``block_size`` token slots (the tensors live in
``attention.PagedKV``; this module only does the bookkeeping). A sequence owns a *block table*:
the blocks holding its tokens in order. A block is in exactly one of three states:

* **in use**: ``ref > 0``; one reference per sequence whose table holds it (a shared prefix block
  has several);
* **cached**: ``ref == 0`` but its contents are registered in the prefix cache, so a later request
  with the same prefix can take it back; these form an LRU and are reused (evicted) only when no
  free block is left;
* **free**: ``ref == 0`` and unregistered.

Prefix cache key. The KV of a block is a function of every token before it and of the adapter
version that produced it (the adapter changes the k/v projections). A full block is registered
under ``(parent, tokens)``: ``parent`` is ``("root", adapter_key)`` for a sequence's first block and
the registration id (``uid``) of the previous block otherwise, and ``tokens`` is the block's token
tuple. Keys are compared exactly (no hash collisions). A ``uid`` is never reused, so a chain whose
parent was evicted can never be matched again, and ``forget(adapter_key)`` unregisters every block
of an adapter version (replaced or deleted versions never match).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Entry:
    key: tuple
    uid: int
    root: Hashable  # the adapter key of the chain


@dataclass
class PrefixStats:
    queried_blocks: int = 0  # full prompt blocks looked up
    hit_blocks: int = 0  # of those, found in the cache
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    prefix_caching: bool = True
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.ref = [0] * self.num_blocks
        self._free: deque[int] = deque(range(self.num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref == 0, registered; LRU first
        self._entry: dict[int, _Entry] = {}  # registered block -> its entry
        self._block_of: dict[tuple, int] = {}  # key -> registered block
        self._by_root: dict[Hashable, set[int]] = {}  # adapter key -> its registered blocks
        self._next_uid = 0

    # ------------------------------------------------------------------------------ counts

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or not): what the prefix cache can hit."""
        return len(self._entry)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------------------ allocation

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with one reference each, or None (and nothing taken) if fewer are available."""
        if n > self.num_available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self._cached.popitem(last=False)
                self._unregister(b)
                self.stats.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; a block no sequence holds becomes cached or free."""
        for b in blocks:
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self._entry:
                    self._cached[b] = None  # most recently used at the end
                else:
                    self._free.append(b)

    # ------------------------------------------------------------------------------ prefix cache

    def match(
        self, adapter_key: Hashable, tokens: Sequence[int], max_blocks: int
    ) -> tuple[list[int], int | None]:
        """The longest cached chain of full blocks of ``tokens`` under ``adapter_key`` (at most
        ``max_blocks``), each with a reference taken, and the uid of its last block (None when
        nothing matched)."""
        if not self.prefix_caching or max_blocks <= 0:
            return [], None
        bs = self.block_size
        parent: object = ("root", adapter_key)
        found: list[int] = []
        last_uid = None
        for i in range(max_blocks):
            b = self._block_of.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if b is None:
                break
            found.append(b)
            last_uid = parent = self._entry[b].uid
        self.stats.queried_blocks += max_blocks
        self.stats.hit_blocks += len(found)
        for b in found:
            if self.ref[b] == 0:
                del self._cached[b]
            self.ref[b] += 1
        return found, last_uid

    def register(
        self, block: int, adapter_key: Hashable, parent_uid: int | None, tokens: Sequence[int]
    ) -> tuple[int, bool]:
        """Register the full ``block`` (holding ``tokens``, after the chain ending in ``parent_uid``,
        None for a first block); returns the uid the chain continues from and whether ``block`` was
        registered. When the same contents are already registered (two sequences computed the same
        prefix), that entry's uid is returned and ``block`` stays unregistered."""
        if len(tokens) != self.block_size:
            raise ValueError(f"only full blocks are cached ({len(tokens)} of {self.block_size} tokens)")
        parent = ("root", adapter_key) if parent_uid is None else parent_uid
        key = (parent, tuple(tokens))
        existing = self._block_of.get(key)
        if existing is not None:
            return self._entry[existing].uid, False
        if block in self._entry:
            raise RuntimeError(f"block {block} is already registered")
        uid = self._next_uid
        self._next_uid += 1
        self._entry[block] = _Entry(key, uid, adapter_key)
        self._block_of[key] = block
        self._by_root.setdefault(adapter_key, set()).add(block)
        return uid, True

    def unregister(self, blocks: Sequence[int]) -> None:
        """Forget the contents of ``blocks`` (e.g. a forward that was to fill them failed)."""
        for b in blocks:
            if b in self._entry:
                self._unregister(b)
                if self.ref[b] == 0:
                    del self._cached[b]
                    self._free.append(b)

    def forget(self, adapter_key: Hashable) -> int:
        """Unregister every block computed with ``adapter_key`` (a replaced or deleted version)."""
        blocks = list(self._by_root.get(adapter_key, ()))
        self.unregister(blocks)
        return len(blocks)

    def _unregister(self, b: int) -> None:
        entry = self._entry.pop(b)
        del self._block_of[entry.key]
        root = self._by_root.get(entry.root)
        if root is not None:
            root.discard(b)
            if not root:
                del self._by_root[entry.root]

    # ------------------------------------------------------------------------------ checks

    def check(self) -> None:
        """Raise unless the bookkeeping is consistent (tests call it after every scenario)."""
        free, cached = set(self._free), set(self._cached)
        if len(free) != len(self._free) or free & cached:
            raise AssertionError("a block is listed twice among the free and cached blocks")
        for b in range(self.num_blocks):
            idle = b in free or b in cached
            if (self.ref[b] == 0) != idle:
                raise AssertionError(f"block {b}: ref {self.ref[b]} but idle={idle}")
            if b in cached and b not in self._entry:
                raise AssertionError(f"cached block {b} is not registered")
            if b in free and b in self._entry:
                raise AssertionError(f"free block {b} is still registered")
        if len(self._block_of) != len(self._entry):
            raise AssertionError("prefix index and entries disagree")
