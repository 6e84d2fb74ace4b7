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

``lookup=True`` (not in the paper) first tries prompt lookup (``PromptLookup``: the continuation of the
context's last 2-3 tokens seen earlier); when it finds ``min_lookup`` tokens or more, that chain is the
draft — copying from the prompt beats the model's generic candidates where the output quotes it. Siblings are distinct (top-k rows are). Drafts are
deterministic given the context and the matrix, so verification is lossless under greedy and
sampling (one-hot q).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from ...errors import InvalidParamsError
from .base import Draft, Drafter

# chance that the rank-r candidate is the target's next token, before anything is observed
_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006)
_PRIOR_WEIGHT = 20.0
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
                 node_cost: float | None = None, lookup: bool = False, min_lookup: int = 2) -> None:
        for knob, value, low in (("num_draft", num_draft, 1), ("top_k", top_k, 1), ("max_depth", max_depth, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidParamsError(f"recycling {knob} must be an integer >= {low}, got {value!r}")
        if top_k > 64:
            raise InvalidParamsError(f"recycling top_k must be <= 64, got {top_k}")
        if node_cost is not None and not (isinstance(node_cost, (int, float)) and node_cost >= 0):
            raise InvalidParamsError(f"recycling node_cost must be a number >= 0 (None = measure), got {node_cost!r}")
        self.num_draft, self.top_k, self.max_depth = num_draft, top_k, max_depth
        self.node_cost = node_cost
        from .prompt_lookup import PromptLookup

        self.lookup = PromptLookup(num_draft) if lookup else None
        self.min_lookup = min_lookup
        # cost[n]: pass time with n nodes relative to none; measured in bind() unless node_cost is given
        self.cost = [1.0 + (node_cost if node_cost is not None else _DEFAULT_NODE_COST) * n
                     for n in range(num_draft + 1)]
        self.observe_topk = top_k
        self.next_tokens: np.ndarray | None = None       # [V, top_k] int32, -1 = unseen
        prior = np.array([_PRIOR[r] if r < len(_PRIOR) else _PRIOR[-1] for r in range(top_k)])
        self._hits = np.tile(prior * _PRIOR_WEIGHT, (max_depth + 1, 1))   # [depth, rank]
        self._visits = np.full(max_depth + 1, _PRIOR_WEIGHT)
        self._last: dict[int, _LastTree] = {}

    def bind(self, target_model, target_tokenizer=None) -> None:
        self._grow(target_model.config.vocab_size)
        if self.node_cost is None:
            from ..cost import relative_cost

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
        """Current estimate of P(rank-r candidate accepted | parent accepted) ``[max_depth + 1, top_k]``."""
        return self._hits / self._visits[:, None]

    def _learn(self, row: int, context: Sequence[int]) -> None:
        """Walk the previous tree along what the context gained: which rank was accepted per depth."""
        last = self._last.pop(row, None)
        if last is None or len(context) <= last.base:
            return
        grown = context[last.base:]
        parent = -1
        for depth, token in enumerate(grown, start=1):   # accepted path, then the target's own token
            kids = [i for i, p in enumerate(last.parents) if p == parent]
            if not kids or depth > self.max_depth:
                return
            self._visits[depth] += 1
            hit = next((i for i in kids if last.tokens[i] == token), None)
            if hit is None:
                return
            self._hits[depth, last.ranks[hit]] += 1
            parent = hit

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        self._learn(row, context)
        if self.lookup is not None:
            found = self.lookup.propose(row, context, k)
            if len(found.tokens) >= self.min_lookup:
                return found
        if self.next_tokens is None or not context or context[-1] >= self.next_tokens.shape[0]:
            return Draft([])
        table, rates = self.next_tokens, self.acceptance()
        tokens: list[int] = []
        parents: list[int] = []
        ranks: list[int] = []
        # heap entries: (-score, order, parent node, parent's candidate row, depth, rank, parent score)
        order = 0
        heap: list = []

        def offer(parent: int, row_tokens: np.ndarray, depth: int, rank: int, base_score: float) -> None:
            nonlocal order
            if depth > self.max_depth or rank >= self.top_k or row_tokens[rank] < 0:
                return
            order += 1
            heapq.heappush(heap, (-base_score * rates[depth, rank], order, parent, row_tokens, depth, rank, base_score))

        offer(-1, table[context[-1]], 1, 0, 1.0)
        gain, best_rate, best_n = 1.0, 1.0, 0
        cost = self.cost
        while heap and len(tokens) < min(k, len(cost) - 1):
            neg, _, parent, row_tokens, depth, rank, base_score = heapq.heappop(heap)
            node = len(tokens)
            token = int(row_tokens[rank])
            tokens.append(token)
            parents.append(parent)
            ranks.append(rank)
            gain += -neg
            if gain / cost[len(tokens)] > best_rate:
                best_rate, best_n = gain / cost[len(tokens)], len(tokens)
            offer(parent, row_tokens, depth, rank + 1, base_score)      # the next sibling
            if token < table.shape[0]:
                offer(node, table[token], depth + 1, 0, -neg)             # the first child
        # pop order is topological (a parent before its children), so any prefix is a tree
        tokens, parents, ranks = tokens[:best_n], parents[:best_n], ranks[:best_n]
        self._last[row] = _LastTree(tokens, parents, ranks, len(context))
        if not tokens:
            return Draft([])
        return Draft(tokens, parents=parents)

    def reset(self, row: int) -> None:
        self._last.pop(row, None)
        if self.lookup is not None:
            self.lookup.reset(row)
