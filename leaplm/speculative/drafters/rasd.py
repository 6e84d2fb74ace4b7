"""RASD (Quan et al., 2025, "RASD: Retrieval-Augmented Speculative Decoding"): a draft model's token
tree and a retrieval tree, the latter pruned by the draft model's distribution, fused into one token
tree that the target verifies in one pass.

Per step, for the same context:

1. **Draft-model tree** (``DraftModel.tree_candidates``, the draft model's tree mode): its greedy
   chain of up to ``draft_length`` tokens (adaptive cap and ``confidence`` stop as in
   ``draft_model``), the next-best ``tree_top_k`` tokens per depth with draft probability >=
   ``tree_min_prob`` as alternative leaves, and the draft's distribution after the context (the
   *root* distribution; the draft computes it anyway for its first token). The draft model keeps
   its own KV cache, rolled back to the longest prefix it shares with the context on every call,
   so it follows whatever the target accepted, a retrieval branch included.
2. **Retrieval** (``Retrieval.continuations``, REST): the continuations (up to ``depth`` tokens) of
   the context's longest suffix found in the datastore (weight 1 per occurrence) and in the
   request's own context (weights that outweigh the datastore; prompt lookup's pick first).
3. **Pruning** (the paper's idea: keep the retrieval candidates the draft model also finds likely):
   a continuation is kept only if its first token is among the ``prune_top_k`` most likely tokens
   of the root distribution **and** has root probability >= ``prune_min_prob``
   (``prune_top_k=0`` and ``prune_min_prob=0`` keep everything). Without a root distribution (the
   draft's position window is full) nothing is pruned.
4. **Fusion by longest-prefix merging**: the chain, every alternative's path (the chain up to it,
   then the alternative) and every kept continuation are inserted into one trie from the context's
   last token: a path shares the nodes of its longest prefix already in the trie and branches
   where it diverges, so identical prefixes are one node and siblings are distinct tokens.
5. **Budget** ``k`` (at most ``num_draft`` nodes): best-first over the trie, a node only after its
   parent, by weight: the **draft chain first** (its weight exceeds everything else together),
   then **retrieval nodes by weight** (the number of retrieved continuations through them, as in
   REST), then **draft alternatives** by draft path probability (their weights sum to less than
   one retrieved continuation). A node proposed by both sources counts for both. This is a
   budgeted variant of the paper, which verifies the union of both trees whole.

The fused tree is a ``Draft(tokens, parents=...)`` (nodes in pick order, ``parents[i] < i``, ``-1``
under the context's last token, siblings distinct), or a plain chain when it is one path. It carries
no probabilities (``probs=None``): both sources are fixed candidates, drafted deterministically (the
draft model's greedy chain and its top-k, whatever the request's sampling parameters), so the
engine's verification is lossless under greedy decoding (the branch matching the target's argmax)
and under sampling (recursive rejection sampling with one-hot q). The draft model must share the
target's tokenizer (refused otherwise in ``bind``: pruning reads its distribution over target ids).

``stats``: counters over the drafter's life: ``kept`` / ``pruned`` retrieved continuations,
``proposed_*`` nodes and ``accepted_*`` nodes by source (``draft`` = the draft model only,
``retrieval`` = retrieval only, ``both``). Acceptance is read from how the context grew at the next
proposal for the row (a request's last step is not counted).

Knobs: ``model`` (the draft model: a name, path or module; required), ``corpus`` (the datastore:
text file, folder, list of those, token-id lists or a ``Datastore``; required), ``num_draft`` (16,
node budget of the fused tree), ``prune_top_k`` (8), ``prune_min_prob`` (0.0); passed to the draft
model: ``draft_length`` (6, its ``num_draft``: the chain's cap), ``adaptive`` (True), ``confidence``
(0.4), ``quantization`` ("int8"), ``draft_vocab`` (None), ``tree_top_k`` (2), ``tree_min_prob``
(0.05), ``tokenizer``, ``download``; passed to retrieval: ``max_match`` (16), ``min_match`` (2),
``max_occurrences`` (64), ``depth`` (10), ``include_context`` (True), ``progress`` (True).

Shapes: ``propose(row, context, k) -> Draft`` with ``len(tokens) <= min(k, num_draft)``,
``parents`` ``[len(tokens)]`` or None; the root distribution ``[V_target]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ...errors import InvalidParamsError
from .base import Draft, Drafter, int_knob
from .draft_model import DraftModel
from .retrieval import Retrieval, _select

SOURCES = ("draft", "retrieval", "both")


def prune(weighted: list[tuple[list[int], int]], root_probs: torch.Tensor | None, top_k: int,
          min_prob: float = 0.0) -> list[tuple[list[int], int]]:
    """The retrieved ``(continuation, weight)`` pairs whose first token is among the ``top_k`` likeliest
    of ``root_probs [V]`` (0: any) and has probability >= ``min_prob``; all of them without ``root_probs``."""
    if root_probs is None or not weighted or (top_k <= 0 and min_prob <= 0):
        return weighted
    probs, vocab = root_probs.detach(), root_probs.shape[-1]   # stays on its device: only a few values move
    allowed = set(probs.topk(min(top_k, vocab)).indices.tolist()) if top_k > 0 else None
    firsts = sorted({c[0] for c, _ in weighted if len(c) and 0 <= c[0] < vocab})
    p = dict(zip(firsts, probs[torch.tensor(firsts, device=probs.device)].float().tolist())) if firsts else {}
    return [(c, w) for c, w in weighted
            if len(c) and c[0] in p and (allowed is None or c[0] in allowed) and p[c[0]] >= min_prob]


def fuse(chain: Sequence[int], alternatives: Sequence[tuple[float, int, int]],
         weighted: Sequence[tuple[Sequence[int], int]], k: int) -> Draft:
    """Merge the draft chain, its alternatives ``(path probability, depth index, token)`` (token a sibling
    of ``chain[depth]``) and weighted retrieved continuations into one trie by longest-prefix matching,
    and keep its ``k`` best nodes: the chain, then retrieval nodes by weight, then alternatives by
    probability (see the module docstring). Deterministic: ``probs=None``."""
    total = sum(w for _, w in weighted)
    items: list[tuple[list[int], float]] = []
    if chain:
        items.append((list(chain), total + 1))          # heavier than every other node together
    items += [(list(c), w) for c, w in weighted if len(c)]
    share = 1.0 / (len(alternatives) + 1)                 # alternatives together weigh < 1 continuation
    items += [(list(chain[:depth]) + [token], p * share) for p, depth, token in alternatives if depth < len(chain)]
    if not items or k < 1:
        return Draft([])
    return _select(items, k, tree=True)


def _prefixes(paths) -> set[tuple[int, ...]]:
    return {tuple(p[:i]) for p in paths for i in range(1, len(p) + 1)}


@dataclass
class _Last:
    tokens: list[int]
    parents: list[int]
    sources: list[str]
    base: int       # len(context) when it was proposed


class RASD(Drafter):
    name = "rasd"

    def __init__(self, model: str | os.PathLike | torch.nn.Module, corpus, num_draft: int = 16,
                 prune_top_k: int = 8, prune_min_prob: float = 0.0, draft_length: int = 6, adaptive: bool = True,
                 confidence: float = 0.4, quantization: str | None = "int8", draft_vocab: int | None = None,
                 tree_top_k: int = 2, tree_min_prob: float = 0.05, tokenizer=None, download: bool = True,
                 max_match: int = 16, min_match: int = 2, max_occurrences: int = 64, depth: int = 10,
                 include_context: bool = True, progress: bool = True) -> None:
        if model is None or model == "":
            raise InvalidParamsError("rasd needs a draft model: {'method': 'rasd', 'model': NAME_OR_PATH, "
                                     "'corpus': PATH} (CLI: --draft-model)")
        if corpus is None:
            raise InvalidParamsError("rasd needs a corpus to retrieve from: {'method': 'rasd', 'model': ..., "
                                     "'corpus': PATH} (CLI: --corpus)")
        self.num_draft = int_knob("rasd", "num_draft", num_draft, 1)
        self.prune_top_k = int_knob("rasd", "prune_top_k", prune_top_k, 0)
        if isinstance(prune_min_prob, bool) or not isinstance(prune_min_prob, (int, float)) \
                or not 0.0 <= prune_min_prob < 1.0:
            raise InvalidParamsError(f"rasd prune_min_prob must be a number in [0, 1), got {prune_min_prob!r}")
        self.prune_min_prob = float(prune_min_prob)
        int_knob("rasd", "draft_length", draft_length, 1)
        int_knob("rasd", "tree_top_k", tree_top_k, 0)
        try:
            self.draft = DraftModel(model, num_draft=draft_length, adaptive=adaptive, confidence=confidence,
                                    quantization=quantization, draft_vocab=draft_vocab, tokenizer=tokenizer,
                                    download=download, tree_top_k=tree_top_k, tree_min_prob=tree_min_prob)
            self.retrieval = Retrieval(corpus, num_draft=self.num_draft, max_match=max_match, min_match=min_match,
                                       max_occurrences=max_occurrences, depth=depth, include_context=include_context,
                                       progress=progress)
        except InvalidParamsError as e:
            raise InvalidParamsError(f"rasd: {e}") from None
        self.stats = {"kept": 0, "pruned": 0} | {f"{w}_{s}": 0 for w in ("proposed", "accepted") for s in SOURCES}
        self._last: dict[int, _Last] = {}

    # ------------------------------------------------------------------ set-up
    def bind(self, target_model, target_tokenizer=None) -> None:
        """Load the draft model and index the corpus for ``target_model``; the draft must share its tokenizer."""
        self.draft.bind(target_model, target_tokenizer)
        if self.draft.bridge is not None:
            raise InvalidParamsError("rasd needs a draft model with the target's tokenizer (it prunes retrieved "
                                     "tokens by the draft's probabilities); use --spec draft for a draft with "
                                     "another tokenizer")
        self.retrieval.bind(target_model, target_tokenizer)

    def start(self, row: int, params) -> None:
        self.draft.start(row, params)
        self.retrieval.start(row, params)
        self._last.pop(row, None)

    def reset(self, row: int) -> None:
        self.draft.reset(row)
        self.retrieval.reset(row)
        self._last.pop(row, None)

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        self._learn(row, context)
        k = min(k, self.num_draft)
        if k < 1:
            return Draft([])
        found = self.draft.tree_candidates(row, context, k)
        weighted = self.retrieval.continuations(row, context)
        kept = prune(weighted, found.root_probs, self.prune_top_k, self.prune_min_prob)
        self.stats["kept"] += len(kept)
        self.stats["pruned"] += len(weighted) - len(kept)
        draft = fuse(found.chain, found.alternatives, kept, k)
        if draft.tokens:
            self._remember(row, context, draft, found, kept)
        return draft

    def _remember(self, row: int, context: Sequence[int], draft: Draft, found, kept) -> None:
        """Label each node of ``draft`` by the source(s) that proposed it (for ``stats``)."""
        parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
        by_draft = _prefixes([found.chain] + [found.chain[:d] + [t] for _, d, t in found.alternatives])
        by_retrieval = _prefixes(c for c, _ in kept)
        paths: list[tuple[int, ...]] = []
        sources = []
        for token, parent in zip(draft.tokens, parents):
            path = (paths[parent] if parent >= 0 else ()) + (token,)
            paths.append(path)
            d, r = path in by_draft, path in by_retrieval
            source = "both" if d and r else "draft" if d else "retrieval"
            sources.append(source)
            self.stats[f"proposed_{source}"] += 1
        self._last[row] = _Last(list(draft.tokens), parents, sources, len(context))

    def _learn(self, row: int, context: Sequence[int]) -> None:
        """Count the previous tree's nodes that the context took (its accepted path), by source."""
        last = self._last.pop(row, None)
        if last is None or len(context) <= last.base:
            return
        parent = -1
        for token in context[last.base:]:
            node = next((i for i, (t, p) in enumerate(zip(last.tokens, last.parents)) if p == parent and t == token),
                        None)
            if node is None:
                return
            self.stats[f"accepted_{last.sources[node]}"] += 1
            parent = node
