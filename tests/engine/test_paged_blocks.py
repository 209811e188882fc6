"""The KV block pool: allocation, references, the adapter-version-keyed prefix cache, eviction."""

from __future__ import annotations

import random

import pytest

from server.engine.paged.blocks import BlockPool


def test_allocate_release_and_running_out():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_available == 1
    assert pool.allocate(2) is None and pool.num_available == 1  # nothing taken on failure
    pool.release(a)
    assert pool.num_available == 4 and pool.num_in_use == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([a[0]])
    pool.check()


def test_prefix_chain_matches_only_same_adapter_key_and_same_tokens_before_it():
    pool = BlockPool(num_blocks=8, block_size=2)
    blocks = pool.allocate(3)
    uid = None
    for i, b in enumerate(blocks):
        uid, new = pool.register(b, ("x", 1), uid, [10 + 2 * i, 11 + 2 * i])
        assert new
    pool.release(blocks)  # cached, not free
    assert pool.num_cached == 3 and pool.num_available == 8
    tokens = [10, 11, 12, 13, 14, 15, 16]
    found, last = pool.match(("x", 1), tokens, max_blocks=3)
    assert found == blocks and last is not None
    assert all(pool.ref[b] == 1 for b in found)
    pool.release(found)
    assert pool.match(("x", 2), tokens, 3) == ([], None)  # another version of the adapter
    assert pool.match(None, tokens, 3) == ([], None)  # the base model
    found, _ = pool.match(("x", 1), [10, 11, 99, 13, 14, 15], 3)  # differs in block 1: stops there
    assert found == blocks[:1]
    pool.release(found)
    found, _ = pool.match(("x", 1), tokens, 2)  # never more than asked
    assert found == blocks[:2]
    pool.release(found)
    assert pool.stats.hit_blocks == 3 + 1 + 2 and pool.stats.queried_blocks == 3 * 4 + 2
    pool.check()


def test_same_contents_registered_twice_keep_one_entry():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = pool.allocate(2)
    uid_a, new_a = pool.register(a, None, None, [1, 2])
    uid_b, new_b = pool.register(b, None, None, [1, 2])
    assert new_a and not new_b and uid_a == uid_b
    pool.release([a, b])
    assert pool.num_cached == 1
    pool.check()


def test_forget_unregisters_a_version_even_while_its_blocks_are_in_use():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = pool.allocate(2)
    uid, _ = pool.register(a, ("x", 1), None, [1, 2])
    pool.register(b, ("x", 1), uid, [3, 4])
    pool.release([b])  # a still held by a running sequence
    assert pool.forget(("x", 1)) == 2
    assert pool.match(("x", 1), [1, 2, 3, 4, 5], 2) == ([], None)
    pool.release([a])
    assert pool.num_cached == 0 and pool.num_available == 4
    pool.check()


def test_eviction_is_least_recently_used_and_evicted_chains_never_match_again():
    pool = BlockPool(num_blocks=3, block_size=1)
    cached = []
    for t in range(3):  # three one-block chains, released in order 0, 1, 2
        (blk,) = pool.allocate(1)
        pool.register(blk, None, None, [t])
        cached.append(blk)
    for blk in cached:
        pool.release([blk])
    found, _ = pool.match(None, [0, 99], 1)  # touch chain 0: now the most recent
    pool.release(found)
    (fresh,) = pool.allocate(1)  # evicts chain 1, the least recently used
    assert fresh == cached[1] and pool.stats.evictions == 1
    assert pool.match(None, [1, 99], 1) == ([], None)
    for t in (0, 2):
        found, _ = pool.match(None, [t, 99], 1)
        assert len(found) == 1
        pool.release(found)
    pool.release([fresh])
    pool.check()


def test_random_operations_keep_the_bookkeeping_consistent():
    rng = random.Random(0)
    pool = BlockPool(num_blocks=16, block_size=2)
    held: list[list[int]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            got = pool.allocate(rng.randint(1, 4))
            if got is not None:
                held.append(got)
        elif op < 0.6 and held:
            blocks = held[rng.randrange(len(held))]
            uid = None
            for b in blocks:
                if b not in pool._entry:
                    uid, _ = pool.register(b, rng.choice([None, ("a", 1)]), uid, [rng.randint(0, 3)] * 2)
        elif op < 0.8:
            found, _ = pool.match(rng.choice([None, ("a", 1)]), [rng.randint(0, 3)] * 8, 4)
            if found:
                held.append(found)
        elif held:
            pool.release(held.pop(rng.randrange(len(held))))
        pool.check()
    for blocks in held:
        pool.release(blocks)
    pool.check()
    assert pool.num_in_use == 0
