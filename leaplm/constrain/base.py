"""The ``Constraint`` protocol (one per sequence) and the packed-bitmask tensor helpers every backend shares.

A *compiled* constraint (``CompiledConstraint``: a JSON schema / regex / grammar compiled for one tokenizer and
one model vocabulary, cached and shared by all requests that use it) makes cheap per-sequence ``Constraint``
objects with ``new()``. A ``Constraint`` is a cursor in the grammar over the tokens generated so far:

* ``fill_mask(into)`` - the tokens allowed next. ``into`` is either an int32 packed bitmask ``[W]``
  (``W = bitmask_width(V) = ceil(V / 32)``; bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed; CPU,
  contiguous: the fast path) or a bool tensor ``[V]`` on any device. ``V`` = ``vocab_size``, the model's logits
  width; ids the tokenizer does not have (embedding padding) are never allowed. When the grammar is complete
  (``can_stop()``) the model's EOS ids are allowed; once it can take nothing more (``is_finished()``) only they are.
  ``mask()`` returns the bool ``[V]`` mask, ``allowed_ids()`` the allowed ids (tests, debugging).
* ``validate(tokens)`` - how many leading ``tokens`` the grammar accepts from the current state (EOS counts as a
  token: accepted only where the grammar may end). Does not change the state.
* ``advance(tokens)`` - consume tokens (all or nothing: raises ``ConstraintError`` and leaves the state as it
  was if one is not allowed). ``rollback(n)`` undoes the last ``n`` consumed tokens (``n <= num_tokens``).
* ``forced()`` - the jump-forward tokens: the tokens the grammar forces from here whatever the model samples
  (e.g. ``{"name":`` for a schema whose first required key is ``name``); ``[]`` when there is a choice.
* ``fill_draft_masks(draft, into)`` - speculative verification: ``into`` int32 ``[>= k + 1, W]``; row ``i`` is
  the mask after ``draft[:i]`` for ``i <= n = validate(draft)``; rows ``n+1..k`` repeat row ``n`` (they are never
  used: ``draft[n]`` is already masked out at row ``n``). Returns ``n``; the state is unchanged.
* ``copy()`` - an independent cursor at the same state (parallel samples / forks).

Logits masking: ``apply_bitmask_(logits [N, V], bitmask [N, W])`` sets the disallowed logits to ``-inf`` on the
logits' device (the ``[N, W]`` int32 bitmask is what crosses to the GPU: 6 KiB per row for a 49k vocabulary).
Errors: ``ConstraintError`` (leaplm.errors) for a disallowed token or a grammar step over its resource limits.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


def bitmask_width(vocab_size: int) -> int:
    """Number of int32 words in one packed mask row for a ``vocab_size``-wide vocabulary."""
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """An int32 ``[rows, W]`` bitmask with every token allowed (all bits set)."""
    return torch.full((rows, bitmask_width(vocab_size)), -1, dtype=torch.int32, device=device)


_SHIFTS: dict[torch.device, Tensor] = {}


def _shifts(device: torch.device) -> Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return s


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """int32 ``[..., W]`` -> bool ``[..., V]`` (True = allowed), on the bitmask's device."""
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1  # [..., W, 32]; arithmetic shift is fine: & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def apply_bitmask_(logits: Tensor, bitmask: Tensor) -> Tensor:
    """In place: ``logits[..., i] = -inf`` where bit ``i`` of ``bitmask`` is clear. ``logits [..., V]``,
    ``bitmask [..., W]`` int32 (any device: moved to the logits' device). Returns ``logits``."""
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill_(~allowed, float("-inf"))


@runtime_checkable
class Constraint(Protocol):
    """The grammar state of one sequence (see the module docstring). Not thread-safe: one user at a time."""

    vocab_size: int   # V: the model's logits width

    @property
    def num_tokens(self) -> int:
        """Tokens consumed so far (the most ``rollback`` can undo)."""

    def fill_mask(self, into: Tensor) -> None:
        """Write the next-token mask: int32 ``[W]`` bitmask (CPU, contiguous) or bool ``[V]`` (any device)."""

    def mask(self, device: torch.device | str | None = None) -> Tensor:
        """The next-token mask as a new bool ``[V]`` tensor."""

    def allowed_ids(self) -> list[int]:
        """The ids allowed next (sorted)."""

    def validate(self, tokens: Sequence[int]) -> int:
        """Length of the longest prefix of ``tokens`` the grammar accepts now; no state change."""

    def advance(self, tokens: Sequence[int]) -> None:
        """Consume ``tokens``; ``ConstraintError`` (state unchanged) if any is not allowed."""

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` consumed tokens."""

    def forced(self) -> list[int]:
        """Jump-forward tokens the grammar forces from the current state (may be empty)."""

    def can_stop(self) -> bool:
        """The text so far is complete under the grammar: EOS is allowed now."""

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete and cannot be extended, or EOS was consumed)."""

    def fill_draft_masks(self, draft: Sequence[int], into: Tensor) -> int:
        """Masks for verifying ``draft`` (``into`` int32 ``[>= k+1, W]``); returns ``validate(draft)``."""

    def copy(self) -> "Constraint":
        """An independent copy at the same state."""


@runtime_checkable
class CompiledConstraint(Protocol):
    """A grammar compiled for one tokenizer and vocabulary; shared and immutable; ``new()`` is cheap."""

    kind: str          # "json_schema" | "json_object" | "regex" | "grammar"
    vocab_size: int

    def new(self) -> Constraint:
        """A fresh per-sequence constraint at the start of the grammar."""
