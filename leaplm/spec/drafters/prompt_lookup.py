"""Prompt lookup decoding (PLD): propose the continuation of the latest earlier occurrence of the
context's last n tokens (n from ``max_ngram`` down to ``min_ngram``), searched in the prompt and the
generated text. Deterministic (q is one-hot), so lossless under greedy and under sampling.

Index: per row, a dict n-gram -> the two most recent end positions, extended incrementally as the
context grows — O(max_ngram) work per new token, no scan of the history per step.
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
        self._indexed: dict[int, int] = {}

    def _extend(self, row: int, context: Sequence[int]) -> dict:
        index = self._index.setdefault(row, {})
        start = self._indexed.get(row, 0)
        if start > len(context):  # a new request reuses the row: start over
            index.clear()
            start = 0
        for end in range(max(start, 1), len(context) + 1):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                key = tuple(context[end - n: end])
                latest = index.get(key)
                index[key] = (end, latest[0] if latest else -1)
        self._indexed[row] = len(context)
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
        self._indexed.pop(row, None)
