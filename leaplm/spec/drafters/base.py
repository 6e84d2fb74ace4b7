"""The drafter contract.

``propose(row, context, k) -> Draft``: up to ``k`` tokens that might follow ``context`` (the row's
prompt + output so far, pending token included). ``Draft.probs`` ``[n, V]`` is the drafter's
distribution for each proposed token, or None for a deterministic drafter (one-hot q).
The engine verifies and commits; a drafter only keeps its own state (it may look at how the
context grew between calls, which is how it learns what was accepted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None = None


class Drafter:
    name = "none"
    num_draft: int = 0

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:  # pragma: no cover - interface
        raise NotImplementedError

    def bind(self, target_model, target_tokenizer=None) -> None:
        """Prepare to draft for ``target_model`` (load weights, check compatibility). Called once."""

    def start(self, row: int, params) -> None:
        """A new request with sampling ``params`` takes ``row`` (the engine calls this)."""
        self.reset(row)

    def reset(self, row: int) -> None:
        """Forget what was learnt about ``row`` (called when a new request takes the row)."""
