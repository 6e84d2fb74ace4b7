"""ADED (Liu et al. 2024, "Adaptive Draft-Verification for Efficient Large Language Model Decoding"):
a training-free token-tree drafter whose model of the target is a tri-gram table learnt from what the
target writes, grown into a tree by a search that balances exploitation and exploration.

Statistics (state shared by all rows and requests, so it adapts to the traffic like a corpus model):
``trigrams[(a, b)]`` and ``bigrams[b]`` hold counts of the tokens that followed ``a b`` (resp. ``b``)
in every context the drafter has seen: each request's prompt once, then its output token by token
(``propose`` ingests whatever the context gained since the last call: the accepted tokens and the
target's own next token). Counts decay: each ingested token multiplies every count by ``decay``
(lazily, per entry, when it is next touched), so recent text outweighs old and long-unused entries
fade out (dropped below ``_FLOOR``). A pair keeps at most ``_MAX_NEXT`` continuations (the lightest
goes), and at most ``capacity`` pairs are kept (least recently updated goes first; about 0.5 kB each).

Estimate: ``p(c | a, b) = (n3(c) + smoothing * p2(c | b)) / (N3 + smoothing)`` with
``p2(c | b) = n2(c) / (N2 + smoothing)``: the tri-gram backs off to the bi-gram (all of it when the
pair is unseen), and ``smoothing`` is the mass kept for continuations never seen, so a pair seen once
is not taken for certain. Candidates: the union of the pair's and the last token's continuations.

Drafting (``propose``): best-first growth from the context's last two tokens. A node ``c`` under a
path with last two tokens ``a b`` has the selection score ``p(c | a, b) + exploration * sqrt(ln(1 +
N(a, b)) / (1 + n(a, b, c)))`` (UCB1, as the paper's MCTS selection), where ``N`` counts how often the
pair ``a b`` was a tested position of a draft (its node was the root or was accepted) and ``n`` how
often ``c`` was among the tested children there: continuations that have rarely been tried get a
bonus that grows with the pair's use, so the tree also tries the second-best lines instead of always
spending its budget on the same ones. A node's priority is its parent's times ``min(1, score)``; the
``num_draft`` best nodes (depth <= ``max_depth``) make the tree, siblings distinct (dict keys).

Learning from verification: the next ``propose`` on the row walks the previous tree along what the
context gained (accepted path, then the target's token): each tested position updates ``N`` and the
``n`` of its children (the UCB statistics), and the per-bin hit rate of the estimates (``p`` in ten
bins, a prior of ``p`` itself): ``calibrated(p)``, the observed chance that a child estimated at ``p``
is accepted. The ingested tokens update the counts.

Cost-aware size (as Token Recycling): a node is accepted with the chance ``product of calibrated(p)``
along its path, so the first ``n`` nodes popped are expected to yield ``1 + sum`` tokens per pass; the
draft keeps the prefix of the pop order (a tree, since a parent pops before its children) that
maximizes ``(1 + sum) / cost[n]``, ``cost[n]`` the pass time with ``n`` nodes relative to a plain
decode step: measured when bound to the target at the context being drafted in (``spec.cost.pass_cost``)
or ``1 + node_cost * n``.
``node_cost=0`` always keeps the whole budget.

Drafts are deterministic given the context and the statistics (one-hot q, ``probs=None``), so
verification is lossless under greedy and sampling. Shapes: ``propose(row, context, k) -> Draft``,
``len(tokens) <= min(k, num_draft)``, ``parents [len(tokens)]`` (``-1`` under the context's last
token, ``parents[i] < i``), or None when the nodes form one chain. Per row only the previous tree and
how much of the context was ingested are kept (``reset`` forgets them, not the statistics).
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ...errors import InvalidParamsError
from ..cost import best_prefix, drafter_cost, pass_cost
from .base import Draft, Drafter

_MAX_NEXT = 16              # continuations kept per pair / token
_FLOOR = 1e-3               # a decayed count below this is forgotten
_BINS = 10                  # calibration bins over the estimate p in [0, 1]
_PRIOR_WEIGHT = 4.0         # pseudo-trials of each bin's prior (the bin's centre)


class _Next:
    """Decayed counts of the tokens that followed one context (a pair or a token), plus UCB statistics."""

    __slots__ = ("stamp", "total", "counts", "visits", "tries")

    def __init__(self, stamp: int) -> None:
        self.stamp = stamp
        self.total = 0.0
        self.counts: dict[int, float] = {}
        self.visits = 0                       # times this context was a tested draft position
        self.tries: dict[int, int] | None = None   # token -> times it was a tested child there

    def age(self, clock: int, decay: float) -> None:
        """Apply the decay since the last touch; forget what fell below ``_FLOOR``."""
        if self.stamp == clock:
            return
        if decay != 1.0:
            f = decay ** (clock - self.stamp)
            counts = self.counts
            for c in list(counts):
                n = counts[c] * f
                if n < _FLOOR:
                    del counts[c]
                    if self.tries:
                        self.tries.pop(c, None)
                else:
                    counts[c] = n
            self.total = sum(counts.values())
        self.stamp = clock

    def add(self, token: int) -> None:
        counts = self.counts
        counts[token] = counts.get(token, 0.0) + 1.0
        self.total += 1.0
        if len(counts) > _MAX_NEXT:
            drop = min((c for c in counts if c != token), key=counts.__getitem__)
            self.total -= counts.pop(drop)
            if self.tries:
                self.tries.pop(drop, None)


@dataclass
class _LastTree:
    tokens: list[int]
    parents: list[int]
    probs: list[float]                       # each node's estimate p(c | a, b)
    keys: list[tuple[int | None, int]]       # each node's (a, b): the two tokens before it
    base: int                                # len(context) when it was proposed


@dataclass
class _Row:
    counted: int = 0                         # context tokens already ingested
    last_token: int = -1                     # context[counted - 1], to notice a foreign context
    last: _LastTree | None = field(default=None)


def _number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise InvalidParamsError(f"aded {name} must be a number {bound}, got {value!r}")
    return value


class ADED(Drafter):
    name = "aded"

    def __init__(self, num_draft: int = 24, max_depth: int = 8, exploration: float = 0.1, decay: float = 0.9998,
                 smoothing: float = 1.0, capacity: int = 65536, node_cost: float | None = None) -> None:
        for knob, value in (("num_draft", num_draft), ("max_depth", max_depth), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidParamsError(f"aded {knob} must be an integer >= 1, got {value!r}")
        self.num_draft, self.max_depth, self.capacity = int(num_draft), int(max_depth), int(capacity)
        self.exploration = _number("exploration", exploration, 0.0)
        self.decay = _number("decay", decay, 0.0, 1.0, low_open=True)
        self.smoothing = _number("smoothing", smoothing, 0.0, low_open=True)
        if node_cost is not None:
            node_cost = _number("node_cost (None = measure)", node_cost, 0.0)
        self.node_cost = node_cost
        # cost[n] at a context length: pass time with n nodes relative to none; measured in bind() unless
        # node_cost is given. self.cost: the table for the context of the draft being grown
        self._pass_cost = drafter_cost(self.num_draft, node_cost)
        self.cost = self._pass_cost.at(0)
        self.trigrams: OrderedDict[tuple[int, int], _Next] = OrderedDict()
        self.bigrams: dict[int, _Next] = {}
        self.clock = 0                                       # tokens ingested so far (all rows)
        centres = (np.arange(_BINS) + 0.5) / _BINS
        self._hits = centres * _PRIOR_WEIGHT
        self._visits = np.full(_BINS, _PRIOR_WEIGHT)
        self._rows: dict[int, _Row] = {}

    def bind(self, target_model, target_tokenizer=None) -> None:
        if self.node_cost is None:
            self._pass_cost = pass_cost(target_model, self.num_draft)

    def reset(self, row: int) -> None:
        self._rows.pop(row, None)

    # ------------------------------------------------------------------ statistics
    def _ingest(self, st: _Row, context: Sequence[int]) -> None:
        """Count the tri-/bi-grams ending at every context token not counted yet."""
        n = len(context)
        if st.counted > n or (st.counted and int(context[st.counted - 1]) != st.last_token):
            st.counted, st.last = 0, None     # not the context we were following: a new one
        tri, bi, decay = self.trigrams, self.bigrams, self.decay
        for i in range(max(st.counted, 1), n):
            self.clock += 1
            b, c = int(context[i - 1]), int(context[i])
            entry = bi.get(b)
            if entry is None:
                entry = bi[b] = _Next(self.clock)
            entry.age(self.clock, decay)
            entry.add(c)
            if i >= 2:
                key = (int(context[i - 2]), b)
                entry = tri.get(key)
                if entry is None:
                    entry = tri[key] = _Next(self.clock)
                    if len(tri) > self.capacity:
                        tri.popitem(last=False)
                else:
                    tri.move_to_end(key)
                entry.age(self.clock, decay)
                entry.add(c)
        if n:
            st.counted, st.last_token = n, int(context[n - 1])

    def estimate(self, a: int | None, b: int) -> dict[int, float]:
        """``p(c | a, b)`` for every known continuation ``c`` (tri-gram backed off to the bi-gram)."""
        alpha = self.smoothing
        out: dict[int, float] = {}
        entry = self.bigrams.get(b)
        if entry is not None:
            entry.age(self.clock, self.decay)
            denom = entry.total + alpha
            out = {c: n / denom for c, n in entry.counts.items()}
        entry = self.trigrams.get((a, b)) if a is not None else None
        if entry is not None:
            entry.age(self.clock, self.decay)
            if entry.counts:
                denom = entry.total + alpha
                backed = {c: alpha * p / denom for c, p in out.items()}
                for c, n in entry.counts.items():
                    backed[c] = backed.get(c, 0.0) + n / denom
                out = backed
        return out

    def candidates(self, a: int | None, b: int) -> list[tuple[float, float, int]]:
        """``(selection score, p, token)`` of the continuations of ``a b``, best score first (ties: token id)."""
        probs = self.estimate(a, b)
        entry = self.trigrams.get((a, b)) if a is not None else None
        bonus = {}
        if self.exploration > 0 and entry is not None and entry.visits:
            log_n, tries = math.log1p(entry.visits), entry.tries or {}
            bonus = {c: self.exploration * math.sqrt(log_n / (1 + tries.get(c, 0))) for c in probs}
        out = [(p + bonus.get(c, 0.0), p, c) for c, p in probs.items()]
        out.sort(key=lambda x: (-x[0], x[2]))
        return out

    def calibrated(self, p: float) -> float:
        """Observed chance that a child estimated at ``p`` is accepted (given its parent was)."""
        b = min(int(p * _BINS), _BINS - 1)
        return float(self._hits[b] / self._visits[b])

    def _learn(self, st: _Row, context: Sequence[int]) -> None:
        """Walk the previous tree along what the context gained: UCB statistics and calibration."""
        last, st.last = st.last, None
        if last is None or len(context) <= last.base:
            return
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(last.parents):
            kids.setdefault(p, []).append(i)
        parent = -1
        for token in context[last.base:]:          # accepted path, then the target's own token
            tested = kids.get(parent)
            if not tested:
                return
            a, b = last.keys[tested[0]]
            entry = self.trigrams.get((a, b)) if a is not None else None
            if entry is not None:
                entry.visits += 1
                if entry.tries is None:
                    entry.tries = {}
                for i in tested:
                    entry.tries[last.tokens[i]] = entry.tries.get(last.tokens[i], 0) + 1
            hit = None
            for i in tested:
                bin_ = min(int(last.probs[i] * _BINS), _BINS - 1)
                self._visits[bin_] += 1
                if last.tokens[i] == token:
                    self._hits[bin_] += 1
                    hit = i
            if hit is None:
                return
            parent = hit

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        st = self._rows.get(row)
        if st is None:
            st = self._rows[row] = _Row()
        self._ingest(st, context)
        self._learn(st, context)
        self.cost = self._pass_cost.at(len(context))    # nodes cost more in a longer context
        k = min(k, self.num_draft, len(self.cost) - 1)
        if k < 1 or not context:
            return Draft([])
        a0 = int(context[-2]) if len(context) >= 2 else None
        b0 = int(context[-1])
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        keys: list[tuple[int | None, int]] = []
        # heap entries: (-priority, order, parent node, candidates, index, depth, parent priority,
        #                parent acceptance, key)
        heap: list = []
        order = 0

        def offer(parent: int, cands: list, index: int, depth: int, pri: float, acc: float, key) -> None:
            nonlocal order
            if index >= len(cands) or depth > self.max_depth:
                return
            order += 1
            heapq.heappush(heap, (-pri * min(1.0, cands[index][0]), order, parent, cands, index, depth, pri, acc, key))

        offer(-1, self.candidates(a0, b0), 0, 1, 1.0, 1.0, (a0, b0))
        accepts: list[float] = []       # each node's calibrated chance of acceptance, in pop order
        while heap and len(tokens) < k:
            neg, _, parent, cands, index, depth, pri, acc, key = heapq.heappop(heap)
            _, p, token = cands[index]
            node = len(tokens)
            tokens.append(token)
            parents.append(parent)
            probs.append(p)
            keys.append(key)
            node_acc = acc * self.calibrated(p)
            accepts.append(node_acc)
            offer(parent, cands, index + 1, depth, pri, acc, key)                      # the next sibling
            if depth < self.max_depth:
                offer(node, self.candidates(key[1], token), 0, depth + 1, -neg, node_acc, (key[1], token))
        # pop order is topological (a parent before its children), so any prefix is a tree
        best_n = best_prefix(accepts, self.cost)
        tokens, parents = tokens[:best_n], parents[:best_n]
        st.last = _LastTree(tokens, parents, probs[:best_n], keys[:best_n], len(context))
        if not tokens:
            return Draft([])
        if all(p == i - 1 for i, p in enumerate(parents)):
            return Draft(tokens)
        return Draft(tokens, parents=parents)
