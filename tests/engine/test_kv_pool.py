"""The block manager: allocation, reference counts, the prefix cache and its LRU eviction."""
from __future__ import annotations

import os

import pytest

from leaplm.engine.kv_pool import BlockManager, slot_of
from leaplm.errors import InvalidParamsError


def test_allocate_and_release_count_references():
    bm = BlockManager(4, 2)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.free_blocks == 1
    assert bm.allocate(2) is None and bm.free_blocks == 1      # nothing taken when short
    bm.release(a)
    assert bm.free_blocks == 4 and bm.used_blocks == 0
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release([0])


def test_released_blocks_are_reused_first():
    bm = BlockManager(8, 2)
    a = bm.allocate(2)
    bm.release(a)
    assert sorted(bm.allocate(2)) == sorted(a)   # the working set stays small (RSS flat)


def test_prefix_cache_hits_full_blocks_only_and_counts_the_rate():
    bm = BlockManager(8, 4)
    tokens = list(range(10, 21))                 # 11 tokens: 2 full blocks
    table = bm.allocate(3)
    h0 = bm.register(table[0], None, tokens[0:4])
    bm.register(table[1], h0, tokens[4:8])
    bm.release(table)
    assert bm.free_blocks == 8                   # cached blocks are free to reuse, and still findable
    blocks, hashes = bm.match_prefix(tokens, len(tokens) - 1)
    assert blocks == table[:2] and len(hashes) == 2
    assert bm.ref[table[0]] == 1 and bm.hit_rate == 1.0
    # a different second block: one hit, then a miss (and the rest of the prompt's blocks count as misses)
    bm.release(blocks)
    other = tokens[:4] + [99] * 8
    blocks, _ = bm.match_prefix(other, len(other) - 1)
    assert blocks == table[:1]
    assert (bm.hits, bm.queries) == (3, 4)


def test_the_same_prefix_after_a_different_first_block_misses():
    bm = BlockManager(8, 2)
    t = bm.allocate(2)
    h = bm.register(t[0], None, [1, 2])
    bm.register(t[1], h, [3, 4])
    bm.release(t)
    assert bm.match_prefix([9, 9, 3, 4, 5], 4)[0] == []    # block 2's hash chains on block 1's


def test_least_recently_released_cached_block_is_evicted_first():
    bm = BlockManager(3, 1)
    a, b, c = bm.allocate(3)
    for block, token in ((a, 1), (b, 2), (c, 3)):
        bm.register(block, None, [token])
    bm.release([a])
    bm.release([b])
    assert bm.allocate(1) == [a]                 # a was released first: evicted, its prefix forgotten
    assert bm.match_prefix([1, 0], 1)[0] == []
    assert bm.match_prefix([2, 0], 1)[0] == [b]  # b is still cached


def test_a_referenced_cached_block_is_never_handed_out():
    bm = BlockManager(2, 1)
    a, b = bm.allocate(2)
    bm.register(a, None, [7])
    bm.release([a])
    hit, _ = bm.match_prefix([7, 8], 1)
    assert hit == [a] and bm.free_blocks == 0 and bm.allocate(1) is None


def test_reset_prefix_cache_frees_cached_blocks():
    bm = BlockManager(2, 1)
    a = bm.allocate(1)
    bm.register(a[0], None, [5])
    bm.release(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix([5, 6], 1)[0] == [] and bm.free_blocks == 2


def test_slot_of_follows_the_block_table():
    assert [slot_of([3, 0], 4, j) for j in range(8)] == [12, 13, 14, 15, 0, 1, 2, 3]


def test_an_empty_pool_is_refused():
    with pytest.raises(InvalidParamsError, match="at least one block"):
        BlockManager(0, 16)


def test_a_second_block_is_not_found_at_the_start_of_another_prompt():
    """Block 2 of one prompt holds the keys of positions 16..31: a prompt that *starts* with the same tokens must
    not get it (its hash chains on block 1's)."""
    bm = BlockManager(8, 2)
    x, y = [1, 2], [3, 4]
    t = bm.allocate(2)
    h = bm.register(t[0], None, x)
    bm.register(t[1], h, y)
    bm.release(t)
    assert bm.match_prefix(y + [5, 6, 7], 4)[0] == []
    assert bm.match_prefix(x + y + [5], 4)[0] == t


def test_cached_blocks_are_reused_before_new_memory_is_touched():
    """1,000 requests of 3 distinct cached blocks each, at most 4 at once: the pool touches only the peak working
    set (12 blocks), never the rest of its 1,000 blocks, and the most recent prompts stay cached."""
    bm = BlockManager(1000, 4)
    live: list[list[int]] = []
    for i in range(1000):
        if len(live) == 4:
            bm.release(live.pop(0))
        blocks = bm.allocate(3)
        parent = None
        for j, b in enumerate(blocks):
            parent = bm.register(b, parent, [i, j, 0, 0])
        live.append(blocks)
    assert bm.touched_blocks == 12 and bm.free_blocks == 1000 - 12
    for blocks in live:
        bm.release(blocks)
    found, _ = bm.match_prefix([999, 0, 0, 0, 999, 1, 0, 0], 8)   # the last request's prompt is still cached
    assert len(found) == 2
    bm.release(found)
    taken = bm.allocate(10)                       # ten more: cached blocks are evicted, no new memory
    assert len(taken) == 10 and max(taken) < 12 and bm.touched_blocks == 12
    assert len(bm.match_prefix([999, 0, 0, 0, 999, 1, 0, 0], 8)[0]) == 2   # the most recent survived (LRU)


_RESIDENCY = """
import os, sys
from types import SimpleNamespace
import torch
from leaplm.engine.kv_pool import KVPool

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

config = SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=64)
before = rss()
pool = KVPool(config, 1024, 16, reserve=sys.argv[1] == "1")   # 4 layers x (k, v) x 2 x 16384 slots x 64 x 4 B = 64 MiB
print(rss() - before, pool.reserved)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
@pytest.mark.parametrize("reserve", [False, True])
def test_a_reserved_pool_is_resident_at_once_and_a_lazy_one_is_not(reserve):
    """In a fresh process (a long-running one reuses pages it freed earlier, which hides new residency)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RESIDENCY, "1" if reserve else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    grew, reserved, size = int(out[0]), out[1] == "True", 64 * 2 ** 20
    assert reserved is reserve
    if reserve:
        assert grew >= 0.9 * size, f"a reserved pool of {size} bytes left only {grew} resident"
    else:
        assert grew <= 0.1 * size, f"a lazy pool of {size} bytes made {grew} resident before any block was used"
