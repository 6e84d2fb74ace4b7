"""``ContextRows``: a fixed-size hashed table from a token n-gram (the last ``order`` tokens of a path) to a
row of ``top_k`` candidate next tokens, with a small confidence level per entry. Token Recycling
(``drafters/recycling.py``) keeps one per context length 2, 3, ... beside its per-token adjacency matrix.

Layout (``slots`` a power of two, ``top_k`` candidates):
- ``keys  [slots]`` uint64: the 64-bit hash of the n-gram stored in the slot, 0 = empty (a gram whose hash
  is 0, one in 2**64, is never stored);
- ``rows  [slots, top_k]`` int32: candidate next tokens, best first, -1 = none;
- ``level [slots]`` int8: how many consecutive updates kept the same best candidate (0 .. ``levels - 1``),
  or ``SEEDED`` (-1) for an entry written from text (``seed``) rather than from the model's candidates.

A slot holds one n-gram; a newer n-gram hashing to the same slot replaces it (bounded memory, no
allocation while decoding). Grams are given by their hash (``gram_hash``; ``extend_hash`` grows a path's
hashes token by token). A lookup checks the full 64-bit hash, so a replaced or colliding entry is
never returned for another n-gram (up to 64-bit hash collisions). All operations are deterministic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SEEDED = -1
_MULT = 0x100000001B3          # FNV-1a-style prime, per token
_MIX = 0x9E3779B97F4A7C15      # Fibonacci hashing of the key into a slot
_MASK = (1 << 64) - 1


def extend_hash(h: int, token: int) -> int:
    """The hash of a gram extended by ``token`` on the right, from the gram's hash (0 for the empty gram):
    a path's hashes follow from its parent's without re-reading the path."""
    return ((h * _MULT) ^ (int(token) + 1)) & _MASK


def gram_hash(gram: Sequence[int]) -> int:
    """64-bit hash of a token n-gram (``extend_hash`` folded over it from 0)."""
    h = 0
    for t in gram:
        h = extend_hash(h, t)
    return h


def gram_hashes(grams: np.ndarray) -> np.ndarray:
    """``gram_hash`` of each row of ``grams [n, order]`` (int) -> uint64 ``[n]``, same values."""
    h = np.zeros(grams.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(grams.shape[1]):
            h = (h * np.uint64(_MULT)) ^ (grams[:, j].astype(np.uint64) + np.uint64(1))
    return h


def settle(level: np.ndarray, same_best: np.ndarray, levels: int) -> np.ndarray:
    """A row's next settledness level: one up (capped at ``levels - 1``) when an update kept its best
    candidate (``same_best``), else 0. Shared by these rows and Token Recycling's per-token matrix."""
    return np.where(same_best, np.minimum(level + 1, levels - 1), 0).astype(level.dtype)


class ContextRows:
    def __init__(self, order: int, top_k: int, slots: int = 1 << 15, levels: int = 4) -> None:
        if slots & (slots - 1) or slots < 2:
            raise ValueError(f"slots must be a power of two >= 2, got {slots}")
        self.order, self.top_k, self.levels = order, top_k, levels
        self._shift = 64 - (slots.bit_length() - 1)
        self.keys = np.zeros(slots, dtype=np.uint64)
        self.rows = np.full((slots, top_k), -1, dtype=np.int32)
        self.level = np.zeros(slots, dtype=np.int8)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes + self.level.nbytes

    def _slot(self, h: int) -> int:
        return ((h * _MIX) & _MASK) >> self._shift

    def _slots(self, h: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((h * np.uint64(_MIX)) >> np.uint64(self._shift)).astype(np.int64)

    def get(self, h: int) -> tuple[np.ndarray, int] | None:
        """(candidate row ``[top_k]``, level) stored for the ``order``-gram whose ``gram_hash`` is ``h``, or None."""
        slot = self._slot(h)
        if h == 0 or int(self.keys[slot]) != h:
            return None
        return self.rows[slot], int(self.level[slot])

    def put(self, h: np.ndarray, candidates: np.ndarray) -> None:
        """Store ``candidates [n, top_k]`` (the model's next-token candidates) for the ``order``-grams whose
        hashes are ``h`` (uint64 ``[n]``); an entry whose best candidate is unchanged gains a level
        (``settle``), any other starts at level 0. Later rows win when two grams share a slot."""
        slots = self._slots(h)
        same = (self.keys[slots] == h) & (self.rows[slots, 0] == candidates[:, 0]) & (self.level[slots] != SEEDED)
        self.level[slots] = settle(self.level[slots], same, self.levels)
        self.keys[slots] = h
        self.rows[slots] = candidates

    def seed(self, tokens: Sequence[int]) -> None:
        """Record, for every ``order``-gram of ``tokens`` but the last, the token that followed it (one
        candidate, level ``SEEDED``): text the output may copy. A later ``put`` of the same gram replaces it."""
        ids = np.asarray(tokens, dtype=np.int64)
        n = len(ids) - self.order
        if n <= 0:
            return
        grams = np.stack([ids[j: j + n] for j in range(self.order)], axis=1)
        h = gram_hashes(grams)
        slots = self._slots(h)
        self.keys[slots] = h
        self.rows[slots] = -1
        self.rows[slots, 0] = ids[self.order:]
        self.level[slots] = SEEDED
