"""Prompt lookup decoding (PLD): propose the continuation of the latest earlier occurrence of the
context's last n tokens (n from ``max_ngram`` down to ``min_ngram``), searched in the prompt and the
generated text. Deterministic (q is one-hot), so lossless under greedy and under sampling.

Index: per row, a dict n-gram -> the two most recent end positions, extended incrementally as the
context grows — O(max_ngram) work per new token, no scan of the history per step. A context that no
longer extends the one indexed (a caller that rolls back, as ``draft_model``'s staged drafting does
between rounds) undoes the index back to the longest common prefix: each indexed position keeps what
it overwrote, so a rollback costs the tokens rolled back, not a re-index of the whole context.
"""
from __future__ import annotations

from typing import Sequence

from ...errors import InvalidParamsError
from .base import Draft, Drafter


class PromptLookup(Drafter):
    name = "prompt_lookup"

    def __init__(self, num_draft: int = 8, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if num_draft < 1:
            raise InvalidParamsError(f"prompt_lookup num_draft must be >= 1, got {num_draft}")
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidParamsError(f"prompt_lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram
        self._index: dict[int, dict[tuple[int, ...], tuple[int, int]]] = {}
        self._seen: dict[int, list[int]] = {}      # per row: the tokens indexed
        # per row and indexed end position: (key, the entry it replaced or None), to roll back
        self._undo: dict[int, list[list[tuple[tuple[int, ...], tuple[int, int] | None]]]] = {}

    def _extend(self, row: int, context: Sequence[int]) -> dict:
        index = self._index.setdefault(row, {})
        seen = self._seen.setdefault(row, [])
        undo = self._undo.setdefault(row, [])
        keep = _common_prefix(seen, context)
        while len(seen) > keep:               # roll back what the context no longer holds, newest first
            for key, old in reversed(undo.pop()):
                if old is None:
                    del index[key]
                else:
                    index[key] = old
            seen.pop()
        for end in range(len(seen) + 1, len(context) + 1):
            changes = []
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                key = tuple(context[end - n: end])
                latest = index.get(key)
                changes.append((key, latest))
                index[key] = (end, latest[0] if latest else -1)
            undo.append(changes)
        seen.extend(context[len(seen):])
        return index

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        index = self._extend(row, context)
        here = len(context)
        for n in range(min(self.max_ngram, here), self.min_ngram - 1, -1):
            ends = index.get(tuple(context[here - n:]))
            if ends is None:
                continue
            end = ends[0] if ends[0] != here else ends[1]
            if end > 0:
                tokens = list(context[end: end + k])
                if tokens:
                    return Draft(tokens)
        return Draft([])

    def reset(self, row: int) -> None:
        self._index.pop(row, None)
        self._seen.pop(row, None)
        self._undo.pop(row, None)


def _common_prefix(a: list[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice compares at C speed: the usual case,
    ``b`` extending ``a``, is one compare; a rollback takes a binary search)."""
    n = min(len(a), len(b))
    if a[:n] == list(b[:n]):
        return n
    lo, hi = 0, n - 1          # a[:lo] == b[:lo] holds; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == list(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo
