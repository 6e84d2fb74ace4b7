"""Adaptive draft length: how many tokens a drafter should propose next.

Two training-free rules, usable together:

- ``DraftLength`` adapts the cap ``k`` from observed acceptance (the schedule transformers calls
  "heuristic"): every token of the last draft accepted -> ``k += 2`` (up to ``k_max``), any
  rejection -> ``k -= 1`` (down to ``k_min``). Fixed ``k``: ``DraftLength(k, adaptive=False)``.
- ``confident(p_max, threshold)``: stop drafting once the drafter's own top probability for the next
  token drops below ``threshold`` (the training-free form of SpecDec++'s stopping rule, which stops
  when the predicted chance that the token is rejected gets too high; the drafter's confidence is
  that prediction). The first draft token is always proposed.
"""
from __future__ import annotations

from typing import Sequence


class DraftLength:
    def __init__(self, k_max: int, k_min: int = 1, adaptive: bool = True) -> None:
        self.k_max, self.k_min, self.adaptive = k_max, min(k_min, k_max), adaptive
        self.k = k_max

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(self.k_min, self.k - 1)


def accepted_prefix(draft: Sequence[int], continuation: Sequence[int]) -> int:
    """How many leading draft tokens the context kept (what the target accepted)."""
    n = 0
    for a, b in zip(draft, continuation):
        if a != b:
            break
        n += 1
    return n


def confident(p_max: float, threshold: float) -> bool:
    return p_max >= threshold
