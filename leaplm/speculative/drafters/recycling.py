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

Context rows (not in the paper; ``context = 4`` by default, ``1`` = the paper's matrix alone): the
matrix keys candidates by one token, so a token that recurs in several places (``the``, ``,``, a newline)
holds only the candidates of its latest occurrence. Beside it the drafter keeps the same candidates
keyed by the last 2, 3, ... ``context`` tokens of the path (``spec.context_rows.ContextRows``: hashed,
``2**15`` slots each, ~1.3 MB per context length at ``top_k = 8``), filled from the same ``observe``
calls (every fed token's path: the committed tail, then its tree ancestors). A node's children come
from the longest context that has a row; its acceptance rates are learnt per source (context length
and how settled the row is: how many consecutive updates kept its best candidate, 0-3), so a row
that keeps repeating itself (a loop in the output) earns deep chains and an unsettled one stays shallow.
Measured on Spec-Bench with SmolLM2, int8 on a 2-core CPU (docs/benchmarks.md, session 11): the paper's
matrix alone 1.90 accepted tokens per pass (1.44x), with context rows 2.40 (1.68x), with prompt rows too
2.63 (1.83x; prompt lookup 2.45, 1.85x in the same run).

Prompt rows (``prompt = True``, the default when ``context >= 2``; not in the paper): at a request's first draft the context
rows are also seeded with the prompt's own n-grams and the token that followed each (one candidate,
a source of its own with its own learnt rate), so text the output copies from the prompt (extraction,
summaries, RAG) is drafted like prompt lookup does, inside the same tree. The model's candidates
replace a seeded row when the target reads that context. ``prompt = False`` drafts only from the
target's recycled candidates.

Cost-aware size: a node's score is the chance the target accepts it, so the first ``n`` nodes
popped are expected to yield ``1 + sum(scores)`` tokens per pass. The draft keeps the ``n`` that
maximizes that gain per unit of pass time, ``(1 + sum) / cost[n]``, where ``cost[n]`` is the pass
time with ``n`` nodes relative to a plain decode step: measured on this machine when the drafter is
bound to its target, at a short and a long context and interpolated at the context being drafted in
(``spec.cost.pass_cost``, about two seconds; a node attends over the whole context), or given as a
linear ``node_cost`` per node. On a CPU, where a wide pass is expensive, trees stay small unless the text
is predictable; on a GPU they grow to the budget.

Prompt lookup (not in the paper; ``PromptLookup``: the continuation of the context's last 2-3 tokens
seen earlier) drafts copies as a chain of their own, beside or instead of prompt rows:
- ``lookup="first"`` (or ``True``; the default): when lookup finds ``min_lookup`` tokens or more, that chain
  alone is the draft; otherwise the recycled tree is. The chain is cut like the tree: to the prefix with
  the best expected tokens per unit of pass time, from the learnt copy acceptance rate (measured: uncut
  24-token copies made passes ~15% dearer for the same tokens per pass as 8-token ones). Measured on
  Spec-Bench (SmolLM2 int8, 2-core CPU, docs/benchmarks.md): more tokens per pass and more speed than the
  tree alone in each of eight runs (sessions 11-13), at or ahead of prompt lookup alone in each (1.00x to
  1.045x). ``lookup=False`` drafts from the recycled tree only.
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
import torch
from torch import Tensor

from ... import native
from ...errors import InvalidParamsError
from ..context_rows import SEEDED, ContextRows, extend_hash, settle
from ..cost import PrefixChooser, best_prefix, drafter_cost, pass_cost
from .base import Draft, Drafter

# chance that the rank-r candidate is the target's next token, before anything is observed
_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015, 0.012, 0.01, 0.008, 0.006)
_PRIOR_WEIGHT = 20.0
_COPY_PRIOR = 0.5           # chance a prompt-lookup node is accepted, before anything is observed
LOOKUP_MODES = (False, "first", "merge")
_LEVELS = 4                 # how settled a row is: consecutive updates that kept its best candidate, capped
_MAX_CONTEXT = 8
_PATIENCE = 8               # stop growing a tree after this many nodes that did not improve its tokens per time


def _extend(hashes: tuple[int, ...], token: int, n: int) -> tuple[int, ...]:
    """A path's suffix hashes after ``token``: element ``o - 1`` hashes its last ``o`` tokens, ``o = 1..n``
    (fewer on a shorter path), each from the path's one-shorter suffix before it."""
    return (extend_hash(0, token),) + tuple(extend_hash(h, token) for h in hashes[: n - 1])


def _suffixes(tokens: Sequence[int], n: int) -> tuple[int, ...]:
    hashes: tuple[int, ...] = ()
    for t in tokens[-n:]:
        hashes = _extend(hashes, t, n)
    return hashes


@dataclass
class _LastTree:
    tokens: list[int]
    parents: list[int]
    ranks: list[int]
    base: int              # len(context) when it was proposed
    sources: list[int]     # per node: the acceptance-table source of the row it came from


def _native_ops(device_type: str = "cpu"):
    """``torch.ops.leaplm_native`` when leaplm's native ops are loaded (a compiled or int8/int4 model loads
    them) and the candidates are on the CPU, else None: the Python loops below, the reference, run."""
    return torch.ops.leaplm_native if device_type == "cpu" and native.available() else None


class TokenRecycling(Drafter):
    name = "recycling"

    def __init__(self, num_draft: int = 24, top_k: int = 8, max_depth: int = 8,
                 node_cost: float | None = None, lookup: bool | str = "first", min_lookup: int = 2,
                 context: int = 4, prompt: bool | None = None) -> None:
        for knob, value, low in (("num_draft", num_draft, 1), ("top_k", top_k, 1), ("max_depth", max_depth, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidParamsError(f"recycling {knob} must be an integer >= {low}, got {value!r}")
        if not isinstance(context, int) or isinstance(context, bool) or not 1 <= context <= _MAX_CONTEXT:
            raise InvalidParamsError(f"recycling context must be an integer in 1..{_MAX_CONTEXT}, got {context!r}")
        prompt = {"true": True, "false": False, None: context >= 2}.get(prompt, prompt)   # default: on if keyable
        if not isinstance(prompt, bool):
            raise InvalidParamsError(f"recycling prompt must be true or false, got {prompt!r}")
        if prompt and context < 2:
            raise InvalidParamsError("recycling prompt=true needs context >= 2 (prompt rows are keyed by 2+ tokens)")
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
        # cost[n] at a context length: pass time with n nodes relative to none; measured in bind() unless
        # node_cost is given. self.cost: the table for the context of the draft being grown
        self._pass_cost = drafter_cost(num_draft, node_cost)
        self.cost = self._pass_cost.at(0)
        self.observe_topk = top_k
        self.next_tokens: np.ndarray | None = None       # [V, top_k] int32, -1 = unseen
        self._level: np.ndarray | None = None            # [V] int8: how settled each matrix row is
        self._tables: list[Tensor] | None = None         # the tables as tensors (``_views``)
        self._cost_t: tuple[list[float], Tensor] | None = None
        self.context, self.prompt = context, prompt
        self.contexts = [ContextRows(n, top_k, levels=_LEVELS) for n in range(2, context + 1)]
        # acceptance-table sources: (context length - 1) * _LEVELS + level, then one for prompt rows
        self.sources = context * _LEVELS + 1
        self.prompt_source = self.sources - 1
        prior = np.array([_PRIOR[r] if r < len(_PRIOR) else _PRIOR[-1] for r in range(top_k)] + [_COPY_PRIOR])
        # [source, depth, rank]; rank top_k = a prompt-lookup copy node (counted under source 0)
        self._hits = np.tile(prior * _PRIOR_WEIGHT, (self.sources, max_depth + 1, 1))
        self._visits = np.full((self.sources, max_depth + 1), _PRIOR_WEIGHT)
        self._copy_visits = np.full(max_depth + 1, _PRIOR_WEIGHT)   # depths where a copy node was offered
        # the counts as tensors sharing their memory (the native drafting loop reads the rates from them)
        self._counts = [torch.from_numpy(a) for a in (self._hits, self._visits, self._copy_visits)]
        self._last: dict[int, _LastTree] = {}
        self._tail: dict[int, list[int]] = {}    # per row: the context's last tokens at the last propose

    def bind(self, target_model, target_tokenizer=None) -> None:
        self._grow(target_model.config.vocab_size)
        if self.node_cost is None:
            self._pass_cost = pass_cost(target_model, self.num_draft)

    def _grow(self, vocab: int) -> None:
        if self.next_tokens is None or self.next_tokens.shape[0] < vocab:
            grown = np.full((vocab, self.top_k), -1, dtype=np.int32)
            level = np.zeros(vocab, dtype=np.int8)
            if self.next_tokens is not None:
                grown[: self.next_tokens.shape[0]] = self.next_tokens
                level[: self._level.shape[0]] = self._level
            self.next_tokens, self._level = grown, level
            self._tables = None

    def observe(self, row: int, fed: Sequence[int], topk: Tensor) -> None:
        paths = self._fed_paths(row, fed) if self.contexts else None
        ops = _native_ops(topk.device.type)
        if ops is not None and self.next_tokens is not None:
            prefix, parents = paths if paths is not None else ([], [])
            args = (prefix[-self.context:], list(fed), parents, topk, _LEVELS, paths is not None)
            need = ops.recycle_observe(self._views(), *args)
            if need:      # a token past the matrix: grow it, then store (nothing was written)
                self._grow(need)
                ops.recycle_observe(self._views(), *args)
            return
        ids = topk.to("cpu").numpy().astype(np.int32)   # [len(fed), top_k]
        self._grow(max(max(fed), int(ids.max())) + 1)
        if paths is not None:
            self._observe_contexts(fed, ids, *paths)
        at = np.asarray(fed)
        self._level[at] = settle(self._level[at], self.next_tokens[at, 0] == ids[:, 0], _LEVELS)
        self.next_tokens[at] = ids                      # a later duplicate of a token wins: fine

    def _fed_paths(self, row: int, fed: Sequence[int]) -> tuple[list[int], list[int]] | None:
        """``(prefix, parents)`` locating each fed token: the committed tokens before the fed ones, and per fed
        token its parent among them (-1: it follows the prefix). The pending tokens continue the context seen
        at the last ``propose``, each draft node hangs off its tree parent. None after a prefill (no path is
        known beyond the matrix's one token) or when the feed is not the last draft (no tree to place it in)."""
        last, tail = self._last.get(row), self._tail.get(row)
        if last is None or tail is None:
            return None
        pending = len(fed) - len(last.tokens)
        if pending < 1 or list(fed[pending:]) != last.tokens or list(fed[:pending]) != tail[-pending:]:
            return None
        parents = list(range(-1, pending - 1)) + [pending - 1 if p < 0 else pending + p for p in last.parents]
        return tail[: len(tail) - pending], parents

    def _observe_contexts(self, fed: Sequence[int], ids: np.ndarray, prefix: list[int], parents: list[int]) -> None:
        """Store each fed token's candidates under its path's last 2.. ``context`` tokens (the Python reference
        of the native ``recycle_observe``)."""
        root = _suffixes(prefix, self.context)
        paths: list[tuple[int, ...]] = []
        for token, parent in zip(fed, parents):
            paths.append(_extend(root if parent < 0 else paths[parent], token, self.context))
        for table in self.contexts:
            o = table.order
            keep = [i for i, hashes in enumerate(paths) if len(hashes) >= o]
            if keep:
                table.put(np.fromiter((paths[i][o - 1] for i in keep), dtype=np.uint64, count=len(keep)), ids[keep])

    def _views(self) -> list[Tensor]:
        """The tables as tensors sharing their memory, in ``recycling_ops.cpp``'s order."""
        if self._tables is None:
            self._tables = [torch.from_numpy(self.next_tokens), torch.from_numpy(self._level)]
            for table in self.contexts:
                self._tables += [torch.from_numpy(table.keys.view(np.int64)), torch.from_numpy(table.rows),
                                 torch.from_numpy(table.level)]
        return self._tables

    def _row(self, hashes: tuple[int, ...], token: int) -> tuple[np.ndarray | None, int]:
        """(candidate row, acceptance source) for a path ending in ``token`` with suffix ``hashes``: the
        longest context with a row, else the matrix."""
        for table in reversed(self.contexts):
            found = table.get(hashes[table.order - 1]) if len(hashes) >= table.order else None
            if found is not None:
                row, level = found
                return row, (self.prompt_source if level == SEEDED else (table.order - 1) * _LEVELS + level)
        if self.next_tokens is None or token >= self.next_tokens.shape[0]:
            return None, 0
        return self.next_tokens[token], int(self._level[token])

    def acceptance(self, source: int | None = 0) -> np.ndarray:
        """Current estimate of P(rank-r candidate accepted | parent accepted) ``[max_depth + 1, top_k + 1]``
        for rows of one ``source`` (0: a matrix row never confirmed; ``(n - 1) * 4 + level``: a row keyed by n
        tokens; ``prompt_source``: a prompt row), or ``[sources, max_depth + 1, top_k + 1]`` for ``None``.
        The last column: a prompt-lookup copy node (``lookup="merge"``); depths past max_depth use the last row."""
        rates = self._hits / self._visits[:, :, None]
        rates[:, :, self.top_k] = self._hits[0, :, self.top_k] / self._copy_visits   # only where a copy was offered
        return rates if source is None else rates[source]

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
            for source in {last.sources[i] for i in kids if last.ranks[i] < self.top_k}:
                self._visits[source, d] += 1        # the siblings from each row offered here
            if any(last.ranks[i] == self.top_k for i in kids):
                self._copy_visits[d] += 1
            hit = next((i for i in kids if last.tokens[i] == token), None)
            if hit is None:
                return
            self._hits[last.sources[hit], d, last.ranks[hit]] += 1
            parent = hit

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        self._learn(row, context)
        self.cost = self._pass_cost.at(len(context))    # nodes cost more in a longer context
        if self.prompt and row not in self._tail:     # a request's first draft: its prompt seeds rows
            for table in self.contexts:
                table.seed(context)
        self._tail[row] = list(context[-(self.context + 8):])
        copy: list[int] = []
        if self.lookup is not None:
            copy = self.lookup.propose(row, context, k).tokens
            if self.lookup_mode == "first" and len(copy) >= self.min_lookup:
                copy = self._cut_copy(copy)
                if copy:
                    self._last[row] = _LastTree(copy, list(range(-1, len(copy) - 1)), [self.top_k] * len(copy),
                                                len(context), [0] * len(copy))
                    return Draft(copy)
            if len(copy) < self.min_lookup:
                copy = []
        ops = _native_ops() if self.next_tokens is not None else None
        if ops is None:
            tree = self._grow_tree(context, k, copy)
        else:
            grown = ops.recycle_grow(self._views(), self._counts, list(context[-self.context:]), copy,
                                     self._cost_tensor(), k, self.max_depth, _PATIENCE, self.prompt_source, _LEVELS)
            tokens, parents, ranks, sources = grown.tolist()
            tree = _LastTree(tokens, parents, ranks, len(context), sources)
        # kept also when empty: observe files the pending token's candidates under its context
        self._last[row] = tree
        return Draft(tree.tokens, parents=tree.parents) if tree.tokens else Draft([])

    def _cost_tensor(self) -> Tensor:
        """``self.cost`` as a float64 tensor (one per table: ``PassCost.at`` returns the same list per bucket)."""
        if self._cost_t is None or self._cost_t[0] is not self.cost:
            self._cost_t = (self.cost, torch.tensor(self.cost, dtype=torch.float64))
        return self._cost_t[1]

    def _cut_copy(self, copy: list[int]) -> list[int]:
        """The prefix of a prompt-lookup chain with the best expected tokens per unit of pass time: the
        ``j``-th copied token is accepted with probability ``rate ** j``, ``rate`` the copy acceptance rate
        pooled over depths (one rate: a depth never drafted would otherwise keep its prior forever)."""
        extra_priors = self.max_depth    # the pooled rate keeps one depth's prior, not max_depth + 1 of them
        hits = self._hits[0, :, self.top_k].sum() - extra_priors * _COPY_PRIOR * _PRIOR_WEIGHT
        rate = hits / (self._copy_visits.sum() - extra_priors * _PRIOR_WEIGHT)
        reach, accepts = 1.0, []
        for _ in range(min(len(copy), len(self.cost) - 1)):
            reach *= rate
            accepts.append(reach)
        return copy[:best_prefix(accepts, self.cost)]

    def _grow_tree(self, context: Sequence[int], k: int, copy: list[int]) -> _LastTree:
        """Best-first tree from the candidate rows, with ``copy`` as one more branch (rank ``top_k``), cut to
        the node prefix with the best expected tokens per unit of pass time (``PrefixChooser``; growth stops
        after ``_PATIENCE`` nodes that did not move that choice). The Python reference of the native
        ``recycle_grow``, which runs instead when the native ops are loaded."""
        rates, copy_rank = self.acceptance(None), self.top_k
        deepest, n = self.max_depth, self.context
        tokens: list[int] = []
        parents: list[int] = []
        ranks: list[int] = []
        sources: list[int] = []
        paths: list[tuple[int, ...]] = []             # per node: its path's suffix hashes (``_extend``)
        root = _suffixes(context, n)
        node_of: dict[tuple[int, int], int] = {}     # (parent, token) -> node: siblings stay distinct
        # heap entries: (-score, order, parent node, depth, rank, parent score, (row, source) | None, copy index)
        order = 0
        heap: list = []

        def offer_candidate(parent: int, depth: int, rank: int, base: float, found) -> None:
            nonlocal order
            row_tokens, source = found
            if row_tokens is None or depth > deepest or rank >= self.top_k or row_tokens[rank] < 0:
                return
            order += 1
            heapq.heappush(heap, (-base * rates[source, depth, rank], order, parent, depth, rank, base, found, -1))

        def offer_copy(parent: int, i: int, depth: int, base: float) -> None:
            nonlocal order
            if i < len(copy):
                order += 1
                heapq.heappush(heap, (-base * rates[0, min(depth, deepest), copy_rank], order, parent, depth,
                                      copy_rank, base, None, i))

        if context:
            offer_candidate(-1, 1, 0, 1.0, self._row(root, context[-1]))
        offer_copy(-1, 0, 1, 1.0)
        cost = self.cost
        chooser = PrefixChooser(cost)     # each node's chance of acceptance, in pop order
        while heap and len(tokens) < min(k, len(cost) - 1) and chooser.since_best < _PATIENCE:
            neg, _, parent, depth, rank, base, found, i = heapq.heappop(heap)
            token = copy[i] if found is None else int(found[0][rank])
            if found is not None:       # the same row's next candidate competes next
                offer_candidate(parent, depth, rank + 1, base, found)
            node = node_of.get((parent, token))
            if node is not None:          # already in the tree through the other source: merge
                if found is None:         # the copy goes on under the existing node
                    offer_copy(node, i + 1, depth + 1, -neg)
                continue
            node = node_of[(parent, token)] = len(tokens)
            tokens.append(token)
            parents.append(parent)
            ranks.append(rank)
            sources.append(0 if found is None else found[1])
            chooser.add(-neg)
            paths.append(_extend(root if parent < 0 else paths[parent], token, n))
            offer_candidate(node, depth + 1, 0, -neg, self._row(paths[node], token))   # the first recycled child
            if found is None:
                offer_copy(node, i + 1, depth + 1, -neg)              # the copy's next token
        # pop order is topological (a parent before its children), so any prefix is a tree
        b = chooser.best_n
        return _LastTree(tokens[:b], parents[:b], ranks[:b], len(context), sources[:b])

    def unverified(self, row: int) -> None:
        self._last.pop(row, None)

    def reset(self, row: int) -> None:
        self._last.pop(row, None)
        self._tail.pop(row, None)
        if self.lookup is not None:
            self.lookup.reset(row)
