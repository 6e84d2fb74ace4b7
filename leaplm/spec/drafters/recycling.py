"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure"): reuse the candidate tokens every
target pass computes anyway.

State shared by all rows and requests (hot start, < 2 MB for a 49k vocabulary at ``top_k = 8``):
an adjacency matrix ``next_tokens [V, top_k]`` (int32, -1 = unseen) holding, for each token, the
target's ``top_k`` most likely next tokens the last time the target read that token. The engine
hands them over after every pass (``observe``: every fed token — root and all tree nodes, accepted
or not — with the top-k of its logits), so the matrix is refreshed with no extra model work.

Drafting (``propose``): a token tree grown from the context's last token by best-first search:
a node's children are the rows of ``next_tokens`` of its token, in rank order; a candidate child
at depth ``d`` and rank ``r`` scores its parent's score times ``accept[d][r]``, the observed rate at
which the target accepted a rank-``r`` candidate at depth ``d`` (start: a prior that falls with
rank; updated each step from which branch the target accepted). The ``num_draft`` best nodes make
the tree, so the tree's shape adapts to how predictable the text is (a static template, as in the
paper, is the special case of frozen rates).

Cost-aware size: a node's score is the chance the target accepts it, so the first ``n`` nodes
popped are expected to yield ``1 + sum(scores)`` tokens per pass. The draft keeps the ``n`` that
maximizes that gain per unit of pass time, ``(1 + sum) / cost[n]``, where ``cost[n]`` is the pass
time with ``n`` nodes relative to a plain decode step: measured on this machine when the drafter is
bound to its target (``spec.cost.relative_cost``, about a second) or given as a linear
``node_cost`` per node. On a CPU, where a wide pass is expensive, trees stay small unless the text
is predictable; on a GPU they grow to the budget.

Prompt lookup (not in the paper; ``PromptLookup``: the continuation of the context's last 2-3 tokens
seen earlier) adds what the matrix cannot know — text the output copies from the prompt:
- ``lookup="first"`` (or ``True``): when lookup finds ``min_lookup`` tokens or more, that chain alone
  is the draft; otherwise the recycled tree is. The chain is cut like the tree: to the prefix with the
  best expected tokens per unit of pass time, from the learnt copy acceptance rate (measured: uncut
  24-token copies made passes ~15% dearer for the same tokens per pass as 8-token ones).
- ``lookup="merge"``: the copy is one more branch of the tree. Its nodes compete in the same best-first
  search with a score learnt like a rank's (an extra rank column, "copy", in the acceptance table),
  every copy node also gets recycled children, and a candidate equal to a sibling already in the
  tree is merged into it (siblings stay distinct). With a cheap wide pass (a GPU) the tree carries
  both; on a CPU the cost-aware cut keeps whichever nodes pay.
Drafts are deterministic given the context and the matrix, so verification is lossless under greedy
and sampling (one-hot q).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from ...errors import InvalidParamsError
from ..cost import best_prefix, relative_cost
from .base import Draft, Drafter

# chance that the rank-r candidate is the target's next token, before anything is observed
_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006)
_PRIOR_WEIGHT = 20.0
_COPY_PRIOR = 0.5           # chance a prompt-lookup node is accepted, before anything is observed
LOOKUP_MODES = (False, "first", "merge")
_DEFAULT_NODE_COST = 0.05   # per node, relative to a decode step, when not measured (unbound drafter)


@dataclass
class _LastTree:
    tokens: list[int]
    parents: list[int]
    ranks: list[int]
    base: int              # len(context) when it was proposed


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(self, num_draft: int = 24, top_k: int = 8, max_depth: int = 8,
                 node_cost: float | None = None, lookup: bool | str = False, min_lookup: int = 2) -> None:
        for knob, value, low in (("num_draft", num_draft, 1), ("top_k", top_k, 1), ("max_depth", max_depth, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidParamsError(f"recycling {knob} must be an integer >= {low}, got {value!r}")
        if top_k > 64:
            raise InvalidParamsError(f"recycling top_k must be <= 64, got {top_k}")
        if node_cost is not None and not (isinstance(node_cost, (int, float)) and node_cost >= 0):
            raise InvalidParamsError(f"recycling node_cost must be a number >= 0 (None = measure), got {node_cost!r}")
        lookup = {True: "first", "true": "first", "false": False, None: False}.get(lookup, lookup)
        if lookup not in LOOKUP_MODES:
            raise InvalidParamsError(f"recycling lookup must be one of false, first (= true), merge; got {lookup!r}")
        self.num_draft, self.top_k, self.max_depth = num_draft, top_k, max_depth
        self.node_cost = node_cost
        from .prompt_lookup import PromptLookup

        self.lookup_mode = lookup
        self.lookup = PromptLookup(num_draft) if lookup else None
        self.min_lookup = min_lookup
        # cost[n]: pass time with n nodes relative to none; measured in bind() unless node_cost is given
        self.cost = [1.0 + (node_cost if node_cost is not None else _DEFAULT_NODE_COST) * n
                     for n in range(num_draft + 1)]
        self.observe_topk = top_k
        self.next_tokens: np.ndarray | None = None       # [V, top_k] int32, -1 = unseen
        prior = np.array([_PRIOR[r] if r < len(_PRIOR) else _PRIOR[-1] for r in range(top_k)] + [_COPY_PRIOR])
        self._hits = np.tile(prior * _PRIOR_WEIGHT, (max_depth + 1, 1))   # [depth, rank]; rank top_k = copy
        self._visits = np.full(max_depth + 1, _PRIOR_WEIGHT)
        self._copy_visits = np.full(max_depth + 1, _PRIOR_WEIGHT)   # depths where a copy node was offered
        self._last: dict[int, _LastTree] = {}

    def bind(self, target_model, target_tokenizer=None) -> None:
        self._grow(target_model.config.vocab_size)
        if self.node_cost is None:
            self.cost = relative_cost(target_model, self.num_draft)

    def _grow(self, vocab: int) -> None:
        if self.next_tokens is None or self.next_tokens.shape[0] < vocab:
            grown = np.full((vocab, self.top_k), -1, dtype=np.int32)
            if self.next_tokens is not None:
                grown[: self.next_tokens.shape[0]] = self.next_tokens
            self.next_tokens = grown

    def observe(self, row: int, fed: Sequence[int], topk: Tensor) -> None:
        ids = topk.to("cpu").numpy().astype(np.int32)   # [len(fed), top_k]
        self._grow(max(max(fed), int(ids.max())) + 1)
        self.next_tokens[np.asarray(fed)] = ids          # a later duplicate of a token wins: fine

    def acceptance(self) -> np.ndarray:
        """Current estimate of P(rank-r candidate accepted | parent accepted) ``[max_depth + 1, top_k + 1]``
        (the last column: a prompt-lookup copy node, ``lookup="merge"``; depths past max_depth use the last row)."""
        rates = self._hits / self._visits[:, None]
        rates[:, self.top_k] = self._hits[:, self.top_k] / self._copy_visits   # only where a copy was offered
        return rates

    def _learn(self, row: int, context: Sequence[int]) -> None:
        """Walk the previous tree along what the context gained: which rank was accepted per depth."""
        last = self._last.pop(row, None)
        if last is None or len(context) <= last.base:
            return
        grown = context[last.base:]
        parent = -1
        for depth, token in enumerate(grown, start=1):   # accepted path, then the target's own token
            kids = [i for i, p in enumerate(last.parents) if p == parent]
            if not kids:
                return
            d = min(depth, self.max_depth)          # copy chains may run deeper than recycled nodes
            self._visits[d] += 1
            if any(last.ranks[i] == self.top_k for i in kids):
                self._copy_visits[d] += 1
            hit = next((i for i in kids if last.tokens[i] == token), None)
            if hit is None:
                return
            self._hits[d, last.ranks[hit]] += 1
            parent = hit

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        self._learn(row, context)
        copy: list[int] = []
        if self.lookup is not None:
            copy = self.lookup.propose(row, context, k).tokens
            if self.lookup_mode == "first" and len(copy) >= self.min_lookup:
                copy = self._cut_copy(copy)
                if copy:
                    chain = list(range(-1, len(copy) - 1))
                    self._last[row] = _LastTree(copy, chain, [self.top_k] * len(copy), len(context))
                    return Draft(copy)
            if len(copy) < self.min_lookup:
                copy = []
        if self.next_tokens is None or not context or context[-1] >= self.next_tokens.shape[0]:
            if not copy:
                return Draft([])
        tree = self._grow_tree(context, k, copy)
        self._last[row] = _LastTree(*tree, len(context))
        tokens, parents, _ = tree
        return Draft(tokens, parents=parents) if tokens else Draft([])

    def _cut_copy(self, copy: list[int]) -> list[int]:
        """The prefix of a prompt-lookup chain with the best expected tokens per unit of pass time: the
        ``j``-th copied token is accepted with probability ``rate ** j``, ``rate`` the copy acceptance rate
        pooled over depths (one rate: a depth never drafted would otherwise keep its prior forever)."""
        extra_priors = self.max_depth    # the pooled rate keeps one depth's prior, not max_depth + 1 of them
        hits = self._hits[:, self.top_k].sum() - extra_priors * _COPY_PRIOR * _PRIOR_WEIGHT
        rate = hits / (self._copy_visits.sum() - extra_priors * _PRIOR_WEIGHT)
        reach, accepts = 1.0, []
        for _ in range(min(len(copy), len(self.cost) - 1)):
            reach *= rate
            accepts.append(reach)
        return copy[:best_prefix(accepts, self.cost)]

    def _grow_tree(self, context: Sequence[int], k: int, copy: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Best-first tree (tokens, parents, ranks) from the matrix, with ``copy`` as one more branch
        (rank ``top_k``), cut to the node prefix with the best expected tokens per unit of pass time."""
        table, rates, copy_rank = self.next_tokens, self.acceptance(), self.top_k
        deepest = self.max_depth
        tokens: list[int] = []
        parents: list[int] = []
        ranks: list[int] = []
        node_of: dict[tuple[int, int], int] = {}     # (parent, token) -> node: siblings stay distinct
        # heap entries: (-score, order, parent node, depth, rank, parent score, candidate row | None, copy index)
        order = 0
        heap: list = []

        def offer_candidate(parent: int, token: int, depth: int, rank: int, base: float) -> None:
            nonlocal order
            if table is None or token >= table.shape[0] or depth > deepest or rank >= self.top_k:
                return
            row_tokens = table[token]
            if row_tokens[rank] < 0:
                return
            order += 1
            heapq.heappush(heap, (-base * rates[depth, rank], order, parent, depth, rank, base, row_tokens, -1))

        def offer_copy(parent: int, i: int, depth: int, base: float) -> None:
            nonlocal order
            if i < len(copy):
                order += 1
                heapq.heappush(heap, (-base * rates[min(depth, deepest), copy_rank], order, parent, depth,
                                      copy_rank, base, None, i))

        if context:
            offer_candidate(-1, context[-1], 1, 0, 1.0)
        offer_copy(-1, 0, 1, 1.0)
        accepts: list[float] = []       # each node's chance of acceptance, in pop order
        cost = self.cost
        while heap and len(tokens) < min(k, len(cost) - 1):
            neg, _, parent, depth, rank, base, row_tokens, i = heapq.heappop(heap)
            token = copy[i] if row_tokens is None else int(row_tokens[rank])
            if row_tokens is not None:
                offer_candidate(parent, context[-1] if parent < 0 else tokens[parent], depth, rank + 1, base)
            node = node_of.get((parent, token))
            if node is not None:          # already in the tree through the other source: merge
                if row_tokens is None:    # the copy goes on under the existing node
                    offer_copy(node, i + 1, depth + 1, -neg)
                continue
            node = node_of[(parent, token)] = len(tokens)
            tokens.append(token)
            parents.append(parent)
            ranks.append(rank)
            accepts.append(-neg)
            offer_candidate(node, token, depth + 1, 0, -neg)          # the first recycled child
            if row_tokens is None:
                offer_copy(node, i + 1, depth + 1, -neg)              # the copy's next token
        # pop order is topological (a parent before its children), so any prefix is a tree
        best_n = best_prefix(accepts, cost)
        return tokens[:best_n], parents[:best_n], ranks[:best_n]

    def reset(self, row: int) -> None:
        self._last.pop(row, None)
        if self.lookup is not None:
            self.lookup.reset(row)
