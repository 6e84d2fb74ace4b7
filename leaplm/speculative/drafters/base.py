"""The drafter contract.

``propose(row, context, k) -> Draft``: up to ``k`` tokens that might follow ``context`` (the row's
prompt + output so far, pending token included). The engine verifies and commits; a drafter only
keeps its own state (it may look at how the context grew between calls, which is how it learns
what was accepted).

A draft is a **chain** (``parents is None``: token i follows token i - 1) or a **token tree**
(``parents[i]`` is the index of node i's parent, ``-1`` for children of the context's last token;
nodes are in topological order, ``parents[i] < i``, and siblings carry distinct tokens). ``k``
bounds the number of nodes either way. One target pass scores every node (tree attention: a node
sees the committed context and its own ancestors), and the longest accepted root-to-leaf path is
committed.

``Draft.probs`` ``[n, V]``: for node i, the drafter's distribution *at its parent* that it was
drawn from, or None for a deterministic drafter (one-hot q: each sibling is a fixed candidate, tried
in order). With probs, siblings share that distribution and must have been drawn from it without
replacement, in the order they appear. Chains and trees stay within ``k`` nodes, which also
bounds their depth by the tokens the row may still generate.

Contract v2 (the serving engine, ``leaplm/engine``; ``row`` is the engine's request id):

- ``committed(row, tokens, hidden, start)``: after each verification the engine says which of the row's tokens it
  committed this step, in order: the fed pending token(s), then the accepted draft tokens (a tree's accepted path);
  ``start`` is the position of ``tokens[0]`` in the row (prompt + output; a prompt served from the prefix cache, or
  recomputed after a preemption, starts past 0 or repeats positions).
  The verdict's last token (sampled, not yet fed) is committed by the next step. A drafter no longer has to diff
  contexts to learn what was accepted (the older drafters still may; they ignore this call).
- ``needs_hidden = True`` asks for ``hidden`` ``[len(tokens), hidden_size]``: the target's final hidden states
  (after the last norm, the LM head's input) of exactly those committed tokens - what EAGLE/Medusa-style heads
  draft from. Otherwise ``hidden`` is None.
- ``propose_batch(rows, contexts, ks) -> [Draft]``: every speculating request of one drafter in a step, in one
  call (the default loops over ``propose``); a trained head batches its forward passes here.

``typical = (threshold, alpha)`` (None by default) asks for Medusa's **lossy** typical acceptance of sampled
requests instead of exact verification (``verify.verify_typical``); greedy requests are verified exactly whatever
it says.

``observe_topk > 0`` asks the engine to call ``observe(row, fed, topk)`` after each target pass:
``fed`` the tokens of that pass (the pending token, then every draft node in order; the last prompt
token after a prefill) and ``topk`` ``[len(fed), observe_topk]`` the target's highest-scoring next
token ids after each of them (raw logits, best first). Token Recycling builds its drafts from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ...errors import InvalidParamsError


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None = None
    parents: list[int] | None = None   # None: a chain

    @property
    def is_tree(self) -> bool:
        return self.parents is not None


class Drafter:
    name = "none"
    num_draft: int = 0
    observe_topk: int = 0
    needs_hidden: bool = False
    typical: tuple[float, float] | None = None

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:  # pragma: no cover - interface
        raise NotImplementedError

    def propose_batch(self, rows: Sequence[int], contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        """Drafts for several rows at once (one per row, each within its ``k``); by default one ``propose`` each."""
        return [self.propose(row, context, k) for row, context, k in zip(rows, contexts, ks)]

    def committed(self, row: int, tokens: Sequence[int], hidden: Tensor | None = None, start: int | None = None) -> None:
        """``tokens`` of ``row`` were committed this step (fed pending tokens, then accepted draft tokens), the first
        at position ``start``; ``hidden [len(tokens), H]`` their final hidden states when ``needs_hidden``, else None."""

    def observe(self, row: int, fed: Sequence[int], topk: Tensor) -> None:
        """The target's top ``observe_topk`` next tokens ``[len(fed), observe_topk]`` after each fed token."""

    def bind(self, target_model, target_tokenizer=None) -> None:
        """Prepare to draft for ``target_model`` (load weights, check compatibility). Called once."""

    def start(self, row: int, params) -> None:
        """A new request with sampling ``params`` takes ``row`` (the engine calls this)."""
        self.reset(row)

    def reset(self, row: int) -> None:
        """Forget what was learnt about ``row`` (called when a new request takes the row)."""

    def unverified(self, row: int) -> None:
        """The last proposal for ``row`` will not be verified (a caller that drafts with this drafter, such as
        ``draft_model``'s staged chain, moved on): learn nothing from how the next context differs from it."""


def int_knob(drafter: str, name: str, value, low: int, extra: str = "") -> int:
    """Validate an integer knob of a drafter: ``value`` as an ``int`` (numpy integers too, not bools)
    when ``>= low``, else ``InvalidParamsError`` naming the drafter, the knob and the value."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidParamsError(f"{drafter} {name} must be an integer >= {low}{extra}, got {value!r}")
    return int(value)
