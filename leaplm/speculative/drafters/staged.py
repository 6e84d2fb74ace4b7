"""Staged drafting: the draft model's own chain is drafted by a training-free drafter and checked in one
draft pass (staged speculative decoding, Spector & Ré 2023; the "vertical cascade" of Cascade Speculative
Drafting, Chen et al. 2024).

A draft model drafts its chain one token per pass, and on a CPU that is most of a speculative step's time
(the Qwen2.5-Coder 0.5B draft costs ~0.4 of the 1.5B target's step; docs/benchmarks.md). Each of those
passes reads all of the draft's weights to produce one token, while a pass over a few more tokens costs
little more. So the chain is speculated too: an inner drafter (Token Recycling by default, learning the
*draft model's* top-k candidates from these same passes) proposes a tree after the chain's newest token,
one draft pass scores the token and the tree (tree attention), and the chain follows the draft's own
argmax down the tree for as long as the tree holds it. Where the tree has no child for the next chain
token, that token is the root of the next inner draft. A round's first draft pass (``start``) also feeds the
tokens the target accepted since the last round, as a chain in front of the tree's root, so the catch-up
pass that plain drafting needs anyway carries a tree too. Measured on the Qwen pair (HumanEval, 2-core CPU,
docs/benchmarks.md session 14): ~1.8 draft passes per round instead of ~6, 1.16-1.22x the unstaged speed.

The chain is the one the draft model drafts alone (the inner drafter only changes how many draft passes
it takes: each next token is still the draft's own choice from its own logits, so acceptance by the target
and the output are unchanged; the numbers differ only by the rounding of a wider pass). Sampled chains
work the same way: a sampled token that the tree holds reuses that node's logits.

Shapes: ``start`` and ``next_logits`` return the draft's logits after the context / the new chain token
``[V_draft]``; a draft pass feeds ``m + n`` tokens (``m`` >= 1 catch-up or chain tokens, then the inner
tree's ``n`` nodes) and keeps their logits ``[m + n, V_draft]``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from ...errors import InvalidParamsError
from ...sampling import top_ids
from .. import registry
from ..tree import chain_parents
from .base import Drafter
from .prompt_lookup import PromptLookup
from .recycling import TokenRecycling

# widest feed that takes a compiled draft's compiled step (which computes every fed position's logits, so
# a long catch-up would pay the LM head for each token; wider feeds run eager with one logit row)
COMPILED_FEED_MAX = 4

if TYPE_CHECKING:   # pragma: no cover
    from .draft_model import DraftModel, _Row

# inner drafters: training-free, and they follow a context that rolls back between rounds (ADED and CopySpec
# would re-count / re-store the whole context at each rollback); imported here, not through the drafters
# package, which imports draft_model (the user of this module)
INNER_CLASSES: dict[str, type[Drafter]] = {cls.name: cls for cls in (TokenRecycling, PromptLookup)}
INNER_DRAFTERS = tuple(INNER_CLASSES)   # their names (registered in leaplm.speculative.registry)


def make_inner(spec) -> Drafter | None:
    """The inner drafter for ``draft_model``'s ``staged`` knob: False/None/"false" = off, True/"true" =
    Token Recycling, a name (or alias) from ``INNER_DRAFTERS``, a ``{"method": name, **knobs}`` dict, or a
    Drafter."""
    if spec in (None, False, "false", "none", "off"):
        return None
    if spec in (True, "true", "on"):
        spec = TokenRecycling.name
    if isinstance(spec, Drafter):
        return spec
    name = spec.get("method") if isinstance(spec, dict) else spec
    info = registry.resolve(name)
    if info is None or info.name not in INNER_CLASSES:
        raise InvalidParamsError(f"draft_model staged must be false, true or a training-free drafter that needs no "
                                 f"model ({', '.join(INNER_DRAFTERS)}); got {name!r}")
    info, knobs = registry.split_spec(spec)
    return registry.construct(INNER_CLASSES[info.name], info, knobs)


class StagedChain:
    """One chain's worth of draft steps for one row (``DraftModel`` makes one per proposal).

    ``start(ids, k)``: sync the draft cache to ``ids`` (in place of ``DraftModel._sync``) with the first inner
    tree in the same pass. ``next_logits(token, remaining)``: the draft's logits after ``token`` appended to
    the chain, from the current inner tree when it holds ``token`` below the last chain token, else from a
    new draft pass (inner draft first).
    ``finish()``: keep the chain's fed tokens in the draft cache (the accepted tree path compacted) and tell
    the inner drafter its last tree was not verified to the end.
    """

    def __init__(self, owner: "DraftModel", st: "_Row", row: int) -> None:
        self.owner, self.st, self.row, self.inner = owner, st, row, owner.inner
        self.budget = max(1, self.inner.num_draft)   # inner tree nodes per pass at most
        self.root = -1                  # the current pass's first fed token
        self.tokens: list[int] = []     # the nodes fed after it (catch-up chain, then the inner tree)
        self.rows: Tensor | None = None  # [1 + n, V_draft] logits of the current pass (None: no pass to follow)
        self.kids: dict[tuple[int, int], int] = {}   # (parent node, token) -> node
        self.path: list[int] = []       # nodes the chain has followed so far

    def start(self, ids: Sequence[int], k: int) -> Tensor:
        """``DraftModel._sync`` with the first inner tree in the same pass: roll the draft cache back to its
        longest prefix shared with ``ids``, feed the rest (as a chain ending in the tree's root), and return
        the logits after ``ids``. A long catch-up (a prompt) is fed as ``_sync`` does, without a tree."""

        catch = self.owner._rollback(self.st, ids)
        if len(catch) > COMPILED_FEED_MAX:
            return self.owner._feed(self.st, catch)
        self._pass(ids, catch, k - 1)
        self.path = list(range(len(catch) - 1))     # the catch-up after the root: a chain, already kept
        return self.rows[len(catch) - 1]

    def next_logits(self, token: int, remaining: int) -> Tensor:
        """Logits after ``token`` (just appended to the chain); ``remaining``: chain tokens still wanted after
        it (bounds the inner tree: deeper nodes could not be used)."""
        if self.rows is not None:
            node = self.kids.get((self.path[-1] if self.path else -1, token))
            if node is not None:
                self.path.append(node)
                return self.rows[1 + node]
            self._keep()
        self._pass(self.st.fed + [token], [token], remaining - 1)
        return self.rows[0]

    def _pass(self, context: Sequence[int], fed: list[int], wanted: int) -> None:
        """One draft pass: ``fed`` (the context's last tokens, not in the draft cache yet; a chain) and the
        inner drafter's tree after ``context`` (at most ``wanted`` nodes: deeper ones could not be used)."""
        owner, st = self.owner, self.st
        room = st.cache.capacity - len(st.fed) - len(fed)
        draft = self.inner.propose(self.row, context, max(0, min(self.budget, wanted, room)))
        tokens = draft.tokens
        parents = draft.parents if draft.is_tree else chain_parents(len(tokens))
        m = len(fed) - 1                  # catch-up nodes after the root; the tree hangs off the last fed token
        nodes = fed[1:] + tokens
        links = chain_parents(m) + [m - 1 if p < 0 else m + p for p in parents]
        rows = owner._tree_pass(st, fed[0], nodes, links)
        if self.inner.observe_topk:
            self.inner.observe(self.row, fed + tokens, self._top(rows))
        self.root, self.tokens, self.rows, self.path = fed[0], nodes, rows, []
        self.kids = {(p, t): i for i, (p, t) in enumerate(zip(links, nodes))}

    def _top(self, rows: Tensor) -> Tensor:
        """The inner drafter's ``observe`` input: each row's top ``observe_topk`` token ids ``[1 + n, top_k]``
        (-1 past a vocabulary smaller than top_k)."""
        k = self.inner.observe_topk
        ids = self.owner._target_ids(top_ids(rows, min(k, rows.shape[-1])))
        if ids.shape[-1] < k:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], k - ids.shape[-1]), -1)], dim=-1)
        return ids

    def _keep(self) -> None:
        if self.rows is not None:
            self.owner._keep_path(self.st, self.root, self.tokens, self.path)
            self.rows = None

    def finish(self) -> None:
        self._keep()
        self.inner.unverified(self.row)

