"""Paged KV memory: one pool of fixed-size blocks shared by every request, with prefix caching.

``KVPool(config, num_blocks, block_size)``: per layer ``k[layer]``, ``v[layer]`` ``[1, kv_heads, num_blocks *
block_size, head_dim]`` (one "row" holding every block: the native attention op reads it as a cache of that many
slots). Block ``i`` is pool slots ``[i * block_size, (i + 1) * block_size)``.

A request owns a *block table* (``list[int]``): its logical slot ``j`` lives in pool slot ``table[j // block_size] *
block_size + j % block_size``. Logical slot ``j`` holds the key/value of the request's token ``j`` once committed
(``Request.num_computed`` counts them); slots past it are scratch for the step being verified (draft tokens, tree
nodes) and are garbage after it.

``BlockManager`` hands out blocks, counts references and caches full blocks by their token prefix (vLLM's and
nano-vllm's scheme): a block whose ``block_size`` slots are all committed is registered under
``hash((hash of the previous block, its tokens))``; a later request whose tokens start with the same blocks reuses
them (``match_prefix``) instead of recomputing them. A block nobody references keeps its contents and its hash in an
LRU list until it is reused (its hash dropped). Cached blocks are read-only: a request writes only at logical slots
>= its ``num_computed``, which lie past every block it shares.

Allocation order keeps memory at the working set: first a released block that holds no cached prefix, then the
least recently used cached block, and only then a never-used block. The pool's tensors are ``torch.empty``, so a
never-used block costs no memory until it is first written: resident memory grows to the peak number of blocks in
use at once and stays there (cached prefixes live in the part of it not in use), however many requests pass.
``reserve=True`` writes every page at once instead (``leaplm serve`` does, as vLLM and llama.cpp's server reserve
their KV memory at start): the process holds its whole footprint from the start, a machine without that memory
fails at start rather than under load, and resident memory does not move however the load varies.

Why this is exact: the key/value of token ``j`` depends only on tokens ``0..j`` (leaplm's kernels are row-invariant
and attention is computed per query), so a block computed by another request holds bit for bit what this request
would have written.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from ..errors import InvalidParamsError
from ..models.paged import slot_of  # noqa: F401  (the mapping lives with the pass geometry)


class KVPool:
    """The pool's tensors. ``move`` copies slots (tree compaction); everything else is the model's and the
    block manager's business."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", reserve: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots = num_blocks * block_size
        shape = (1, config.num_kv_heads, self.num_slots, config.head_dim)
        # empty, not zeros: a slot is read only after it was written (attention reads a query's own spans), and
        # untouched pages of a large allocation are not resident, so memory grows with the blocks in use
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.reserved = bool(reserve)
        if reserve:   # write every page now: the whole pool resident from the start (see the module docstring)
            for t in (*self.k, *self.v):
                t.zero_()

    @staticmethod
    def bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy pool slot ``src[i]`` to ``dst[i]`` in every layer (all sources read before any write)."""
        if not src:
            return
        device = self.k[0].device
        s, d = torch.tensor(list(src), device=device), torch.tensor(list(dst), device=device)
        for cache in (*self.k, *self.v):
            cache[0, :, d] = cache[0, :, s]

    def gather(self, layer: int, slots: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Keys and values of pool ``slots`` in order: ``[1, kv_heads, len(slots), D]`` each (copies)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.k[0].device)
        return self.k[layer][:, :, index], self.v[layer][:, :, index]


class BlockManager:
    """Allocation, reference counts and the prefix cache of a pool's blocks (no tensors).

    ``free_blocks`` counts what ``allocate`` can hand out: never-used blocks plus cached blocks nobody references.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InvalidParamsError(f"the KV pool needs at least one block of at least one slot, got {num_blocks} "
                                     f"blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self._free: list[int] = []                               # released, holding no cached prefix: reused first
        self._fresh = list(range(num_blocks - 1, -1, -1))        # never used (not resident yet), lowest first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced blocks, oldest first
        self._hash_of: dict[int, int] = {}                      # block -> its prefix hash
        self._tokens_of: dict[int, tuple[int, ...]] = {}        # block -> its tokens (checked on a hit)
        self._block_of: dict[int, int] = {}                     # prefix hash -> block
        self.queries = 0        # prompt blocks looked up in the cache
        self.hits = 0           # ... and found

    # ------------------------------------------------------------------ allocation
    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._fresh) + len(self._evictable)

    @property
    def touched_blocks(self) -> int:
        """Blocks ever handed out: the pool's resident part (its high-water mark)."""
        return self.num_blocks - len(self._fresh)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks with one reference each, or None (nothing taken) when fewer are free."""
        if count > self.free_blocks:
            return None
        out = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            elif self._evictable:   # the least recently used cached block loses its cache entry
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            else:                   # only now new memory
                block = self._fresh.pop()
            self.ref[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody references becomes free (cached ones stay findable
        until reused). Released in reverse so a request's first blocks are evicted last."""
        for block in reversed(blocks):
            if self.ref[block] <= 0:
                raise RuntimeError(f"block {block} released more often than it was taken")
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ prefix cache
    @staticmethod
    def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
        return hash((parent, tuple(tokens)))

    def match_prefix(self, tokens: Sequence[int], limit: int) -> tuple[list[int], list[int]]:
        """The cached blocks that hold ``tokens``' first full blocks, up to ``limit`` tokens: ``(blocks, hashes)``;
        each returned block gains a reference. Counts the lookups for ``hit_rate``."""
        if not self.prefix_caching:
            return [], []
        blocks, hashes = [], []
        parent = None
        bs = self.block_size
        for i in range(limit // bs):
            chunk = tuple(tokens[i * bs: (i + 1) * bs])
            h = self.block_hash(parent, chunk)
            self.queries += 1
            block = self._block_of.get(h)
            if block is None or self._tokens_of.get(block) != chunk:
                self.queries += limit // bs - i - 1   # the rest of the prompt's blocks miss too
                break
            self.hits += 1
            if self.ref[block] == 0:
                del self._evictable[block]
            self.ref[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def register(self, block: int, parent: int | None, tokens: Sequence[int]) -> int:
        """Record that ``block`` (now full and committed) holds ``tokens`` after the prefix hashed ``parent``;
        returns its hash. A prefix already cached in another block keeps that block."""
        chunk = tuple(tokens)
        h = self.block_hash(parent, chunk)
        if self.prefix_caching and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h
            self._tokens_of[block] = chunk
        return h

    def forget(self, block: int) -> None:
        """Drop ``block``'s prefix-cache entry (its holder is about to rewrite it)."""
        self._forget(block)

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        self._tokens_of.pop(block, None)
        if h is not None and self._block_of.get(h) == block:
            del self._block_of[h]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (unreferenced cached blocks become plain free blocks)."""
        for block in list(self._hash_of):
            self._forget(block)
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._free.append(block)

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt blocks found in the cache (0 when none was looked up)."""
        return self.hits / self.queries if self.queries else 0.0
