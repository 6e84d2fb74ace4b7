"""Medusa: ``K`` trained heads guess the tokens after the next one from the target's last hidden state (Medusa-1).

``Medusa(path=DIR)`` loads heads made by ``leaplm train-drafter --method medusa`` (``speculative/heads/medusa.py``
has their equations). Per request the drafter keeps only the target's final hidden state of the last committed
token (drafter contract v2: ``needs_hidden``); the pending token (``context[-1]``) is the target's own next token
from that state, and head ``k`` guesses the token ``k`` places after it.

``propose(row, context, k)`` (``propose_batch``: every speculating request in one heads pass):

1. one pass of the ``K`` heads over the feature gives ``K`` draft-vocabulary distributions;
2. **candidate tree** (Medusa's tree of the heads' top-k, built by value instead of from a fixed table): a node at
   depth ``d`` is one of head ``d``'s ``top_k`` tokens, under a node of depth ``d - 1``; its score is the product of
   the heads' probabilities along its path (the heads are independent guesses, so a child's probability does not
   depend on its parent's token). Nodes are grown best first, so the ``num_draft`` likeliest come out closed under
   parents;
3. of those, as many as pay for the wider verification pass (``TrainedDrafter.choose``: calibrated path
   probabilities against the target's measured pass cost).

Drafts are deterministic (no q), so verification is exact for greedy and sampled requests alike.

**Typical acceptance** (``typical=True``; Medusa's section 2.3.1) is an explicitly **lossy** option for sampled
requests: a draft token ``x`` is accepted where the target's processed distribution ``p`` at its parent gives it
``p(x) > min(threshold, alpha * exp(-H(p)))``, the longest such path wins, and the next token is sampled from ``p``
(``verify.verify_typical``). The output is no longer distributed as the target's sampling (greedy requests are not
affected); docs/trained-drafters.md measures what it costs.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch
from torch import Tensor

from ...errors import InvalidParamsError
from .base import Draft, int_knob
from .trained import TrainedDrafter, int8_linears


class Medusa(TrainedDrafter):
    name = "medusa"

    def __init__(self, path: str, num_draft: int = 16, top_k: int = 8, quantization: str | None = "int8",
                 node_cost: float | None = None, typical: bool = False, threshold: float = 0.09,
                 alpha: float = 0.3, lookup: bool = False) -> None:
        super().__init__("medusa", num_draft, quantization, node_cost, lookup)
        self.path = str(path)
        self.top_k = int_knob("medusa", "top_k", top_k, 1)
        if not isinstance(typical, bool):
            raise InvalidParamsError(f"medusa typical must be true or false, got {typical!r}")
        for knob, value in (("threshold", threshold), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InvalidParamsError(f"medusa {knob} must be a number in (0, 1], got {value!r}")
        self.typical = (float(threshold), float(alpha)) if typical else None
        from ..heads.medusa import MedusaHeads

        self.heads = MedusaHeads.load(self.path)
        self.last: dict[int, tuple[int, Tensor]] = {}     # row -> (position, feature [H]) of its last committed token

    def bind(self, target_model, target_tokenizer=None) -> None:
        heads = self.heads
        heads.attach(target_model)
        heads.eval().requires_grad_(False)
        if self.quantization == "int8" and target_model.device.type == "cpu":
            for head in heads.blocks:
                int8_linears(head, [str(i) for i in range(len(head))])
            heads.lm_matmul = int8_linears(heads, (), heads.lm)
        self.bind_cost(target_model)

    def reset(self, row: int) -> None:
        super().reset(row)
        self.last.pop(row, None)

    def committed(self, row: int, tokens: Sequence[int], hidden: Tensor | None = None, start: int | None = None) -> None:
        self.count_verdict(row, tokens)
        if hidden is not None and start is not None and len(tokens):
            self.last[row] = (start + len(tokens) - 1, hidden[-1].float().clone())

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        return self.propose_batch([row], [context], [k])[0]

    @torch.inference_mode()
    def propose_batch(self, rows: Sequence[int], contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in rows]
        ready = []
        for i, (row, context, k) in enumerate(zip(rows, contexts, ks)):
            copy = self.copy_draft(row, context, min(k, self.num_draft))
            if copy is not None:
                drafts[i] = copy
                continue
            last = self.last.get(row)
            # the feature of the last committed token (context[-2]); none after a jump-forward: no draft this step
            if min(k, self.num_draft) >= 1 and last is not None and last[0] == len(context) - 2:
                ready.append(i)
        if not ready:
            return drafts
        feats = torch.stack([self.last[rows[i]][1] for i in ready])              # [R, H]
        logp = torch.log_softmax(self.heads(feats).float(), dim=-1)             # [K, R, Vd]
        top_lp, top_ix = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)    # [K, R, top_k]
        vocab = self.heads.draft_vocab
        for r, i in enumerate(ready):
            budget = min(ks[i], self.num_draft)
            tokens, parents, scores = _best_first(top_lp[:, r].tolist(), vocab[top_ix[:, r]].tolist(), budget)
            drafts[i] = self.choose(rows[i], tokens, parents, scores, budget, len(contexts[i]))
        return drafts


def _best_first(lp: list[list[float]], ids: list[list[int]], budget: int) -> tuple[list[int], list[int], list[float]]:
    """The ``budget`` likeliest nodes of the heads' cartesian tree, best first (so each after its parent):
    ``lp[d][i]``/``ids[d][i]`` head ``d``'s ``i``-th likeliest token. Returns (tokens, parents, log path scores)."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    heap = [(-lp[0][0], 0, 0, -1, 0.0)]        # (-score, depth, rank, parent node, parent's score)
    while heap and len(tokens) < budget:
        neg, d, i, parent, base = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(ids[d][i])
        parents.append(parent)
        scores.append(-neg)
        if i + 1 < len(lp[d]):                 # the next sibling
            heapq.heappush(heap, (-(base + lp[d][i + 1]), d, i + 1, parent, base))
        if d + 1 < len(lp):                    # the first child
            heapq.heappush(heap, (neg - lp[d + 1][0], d + 1, 0, node, -neg))
    return tokens, parents, scores
