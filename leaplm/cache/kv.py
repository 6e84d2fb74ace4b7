"""KVCache: preallocated keys/values indexed by absolute position, plus per-row committed lengths.

Layout per layer: ``k[layer]``, ``v[layer]`` are ``[B, kv_heads, capacity, head_dim]``; slot ``s``
of row ``b`` holds the key/value of the token at position ``s`` of that row.

Contract (the engine commits, the model never moves the cache):
- The model *writes* keys/values of the tokens it is given at their positions (``write``), whether
  or not they will be kept. Writing never changes ``lengths``.
- The engine *commits* by setting ``lengths[b]`` (``commit``/``rollback``). Slots at or past a row's
  length are garbage and are never read by a query at a smaller position, because attention masks
  are positional (a query at position p sees slots ``<= p``).
- Rollback of rejected speculative tokens is therefore free: set the length back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PromptTooLongError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.batch = batch
        self.lengths: list[int] = [0] * batch  # committed tokens per row (host-side: no device syncs)

    @classmethod
    def for_model(cls, config, batch: int, capacity: int, dtype: torch.dtype, device) -> "KVCache":
        return cls(config.num_layers, batch, config.num_kv_heads, config.head_dim, capacity, dtype, device)

    def row(self, b: int) -> "KVCache":
        """A one-row cache whose keys and values are views of row ``b``'s storage (``[1, kv_heads,
        capacity, D]`` per layer): the model writes through it into this cache. Its ``lengths`` is a
        copy (the engine commits on the whole cache)."""
        one = KVCache.__new__(KVCache)
        one.k = [t[b: b + 1] for t in self.k]
        one.v = [t[b: b + 1] for t in self.v]
        one.capacity, one.batch, one.lengths = self.capacity, 1, [self.lengths[b]]
        return one

    def write(self, layer: int, k: Tensor, v: Tensor, positions: Tensor, contiguous_start: int | None) -> None:
        """Store ``k, v [B, T, kv_heads, D]`` at ``positions [B, T]``.

        ``contiguous_start``: when every row writes positions ``start .. start+T-1`` the caller
        passes ``start`` and the write is one slice copy; otherwise a scatter by position.
        """
        if contiguous_start is not None:
            end = contiguous_start + k.shape[1]
            self.k[layer][:, :, contiguous_start:end] = k.transpose(1, 2)
            self.v[layer][:, :, contiguous_start:end] = v.transpose(1, 2)
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        # advanced indices (rows, positions) around a slice: the indexed dims come first -> [B, T, H, D]
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def view(self, layer: int, upto: int) -> tuple[Tensor, Tensor]:
        """Keys and values of slots ``[0, upto)``: ``[B, kv_heads, upto, D]`` each (views)."""
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def move(self, row: int, moves: list[tuple[int, int]]) -> None:
        """Copy slot ``src`` to slot ``dst`` of ``row`` in every layer, for ``(src, dst)`` in order
        (token-tree compaction: the accepted path's scratch slots become the committed ones).

        All sources are read before any destination is written, which equals applying the moves
        in order as long as no source is an earlier move's destination (true for compaction).
        """
        if not moves:
            return
        device = self.k[0].device
        src = torch.tensor([m[0] for m in moves], device=device)
        dst = torch.tensor([m[1] for m in moves], device=device)
        for cache in (*self.k, *self.v):
            cache[row, :, dst] = cache[row, :, src]

    def check_room(self, needed: int) -> None:
        if needed > self.capacity:
            raise PromptTooLongError(f"{needed} positions needed but the KV cache holds {self.capacity}")

    def commit(self, row: int, length: int) -> None:
        """Set the committed length of ``row`` (forward after accepting tokens, back to roll back)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length {length} outside [0, {self.capacity}]")
        self.lengths[row] = length

    rollback = commit
