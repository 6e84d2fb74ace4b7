"""EAGLE: a trained one-layer head drafts from the target's own features (EAGLE-1 head, EAGLE-2 dynamic trees).

``Eagle(path=DIR)`` loads a head made by ``leaplm train-drafter --method eagle`` (``speculative/heads/eagle.py``
has the head's equations). Per request the drafter keeps the target's final hidden states of the committed tokens
(drafter contract v2: ``needs_hidden``; ``committed(row, tokens, hidden, start)``) and the head's own keys/values,
by index (index ``j`` reads feature ``f_j`` and token ``x_{j+1}``).

``propose(row, context, k)`` with ``b = len(context) - 2`` (the last committed token; ``context[-1]`` is the
pending token):

1. Keys/values of the indices whose feature arrived since the last call are computed in one pass (a prompt's
   prefill arrives at once; after that 1 + accepted tokens per step); index ``b`` also runs the whole layer: its
   output ``g_b`` and draft-vocabulary log-probabilities are the tree's root.
2. **EAGLE-2 tree**: at each of ``depth`` levels the ``width`` likeliest nodes of the newest level (by the product
   of the draft probabilities on their path) get their ``top_k`` likeliest next tokens as children, computed in one
   head pass over those nodes (a node attends to the committed indices and its own ancestors). ``width=1,
   top_k=1`` drafts a chain.
   Growth stops early when no node of the newest level has a (calibrated) path probability of ``min_prob``.
3. Of the ``min(k, num_draft)`` likeliest nodes of the whole tree, as many as pay for the wider verification pass
   (``TrainedDrafter.choose``, ``drafters/trained.py``: calibrated path probabilities against the target's measured
   pass cost). They are the draft, in topological order.

Drafts are deterministic (no q), so verification is lossless for greedy and sampled requests alike. Indices
without a feature (prompt tokens served from the prefix cache, which the target never recomputed) are simply absent
from the head's attention: acceptance may drop, the output cannot change. The head runs in float32, or with its
projections in int8 (``quantization="int8"``, the default on CPU: the head's weight bytes dominate its cost at
batch 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ...errors import InvalidParamsError
from .base import Draft, int_knob
from .trained import TrainedDrafter, int8_linears


@dataclass
class _Row:
    feats: Tensor                  # [cap, H] the target's features by index
    known: Tensor                  # [cap] bool: feature arrived
    k: Tensor                      # [cap, kv, D] the head's keys by index
    v: Tensor
    have: Tensor                   # [cap] bool: key/value computed


class Eagle(TrainedDrafter):
    name = "eagle"

    def __init__(self, path: str, num_draft: int = 16, depth: int = 5, top_k: int = 4, width: int = 4,
                 quantization: str | None = "int8", node_cost: float | None = None, min_prob: float = 0.05,
                 lookup: bool = False) -> None:
        super().__init__("eagle", num_draft, quantization, node_cost, lookup)
        self.path = str(path)
        self.depth = int_knob("eagle", "depth", depth, 1)
        self.top_k = int_knob("eagle", "top_k", top_k, 1)
        self.width = int_knob("eagle", "width", width, 1)
        if not (isinstance(min_prob, (int, float)) and 0 <= min_prob < 1):
            raise InvalidParamsError(f"eagle min_prob must be a number in [0, 1), got {min_prob!r}")
        self.min_prob = float(min_prob)
        from ..heads.eagle import EagleHead

        self.head = EagleHead.load(self.path)    # a missing or broken folder is named before the target loads
        self.rows: dict[int, _Row] = {}

    # ------------------------------------------------------------------ setup
    def bind(self, target_model, target_tokenizer=None) -> None:
        head = self.head
        head.attach(target_model)
        head.eval().requires_grad_(False)
        if self.quantization == "int8" and target_model.device.type == "cpu":
            lm = int8_linears(head, ("fc", "qkv", "o", "gate_up", "down"), head.lm)
            head.logits = lambda g: lm(g)
        self.bind_cost(target_model)

    def reset(self, row: int) -> None:
        super().reset(row)
        self.rows.pop(row, None)

    def _row(self, row: int, need: int) -> _Row:
        r = self.rows.get(row)
        c = self.head.config
        if r is None or r.feats.shape[0] < need:
            cap = max(need, 256, 2 * (r.feats.shape[0] if r is not None else 0))
            grown = _Row(torch.zeros(cap, c.hidden_size), torch.zeros(cap, dtype=torch.bool),
                         torch.zeros(cap, c.num_kv_heads, c.head_dim), torch.zeros(cap, c.num_kv_heads, c.head_dim),
                         torch.zeros(cap, dtype=torch.bool))
            if r is not None:
                n = r.feats.shape[0]
                for new, old in ((grown.feats, r.feats), (grown.known, r.known), (grown.k, r.k), (grown.v, r.v),
                                 (grown.have, r.have)):
                    new[:n] = old
            self.rows[row] = r = grown
        return r

    def committed(self, row: int, tokens: Sequence[int], hidden: Tensor | None = None, start: int | None = None) -> None:
        self.count_verdict(row, tokens)
        if hidden is None or start is None or not len(tokens):
            return
        r = self._row(row, start + len(tokens) + 1)
        r.feats[start: start + len(tokens)] = hidden.float()
        r.known[start: start + len(tokens)] = True

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        b = len(context) - 2
        budget = min(k, self.num_draft)
        copy = self.copy_draft(row, context, budget)
        if copy is not None:
            return copy
        r = self.rows.get(row)
        if budget < 1 or b < 0 or r is None or b >= r.known.shape[0] or not r.known[b]:
            return Draft([])   # no feature for the last committed token (e.g. a jump-forward): no draft this step
        head = self.head
        # 1. keys/values of the indices whose feature is new (index b always: its next token may have changed)
        fresh = (r.known[: b + 1] & ~r.have[: b + 1]).nonzero().flatten()
        if not len(fresh) or fresh[-1] != b:
            fresh = torch.cat((fresh, torch.tensor([b])))
        u = head.inputs(r.feats[fresh], torch.tensor([context[j + 1] for j in fresh.tolist()]))
        rope = head.rope(fresh + 1)
        q, kk, vv = head.project(u[None], (rope[0][None], rope[1][None]))
        r.k[fresh], r.v[fresh], r.have[fresh] = kk[0], vv[0], True
        real = r.have[: b + 1].nonzero().flatten()
        keys, values = r.k[real], r.v[real]
        g = head.finish(u[-1:], head.attend(q[0, -1:], keys, values, torch.ones(1, len(real), dtype=torch.bool)))
        logp = torch.log_softmax(head.logits(g).float(), dim=-1)          # [1, Vd]
        # 2. grow the tree level by level
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        sk = sv = None                                                    # scratch keys of the expanded nodes
        expanded: list[int] = []                                          # node index of each scratch row
        frontier = [-1]                                                   # node -1: the root (index b)
        base = [0.0]
        g_of: dict[int, Tensor] = {}                                     # node -> its head output
        vocab = head.draft_vocab
        levels = min(self.depth, budget)
        for depth in range(levels):
            top_lp, top_ix = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)   # [F, top_k]
            children: list[int] = []
            for f, parent in enumerate(frontier):
                for lp, ix in zip(top_lp[f].tolist(), top_ix[f].tolist()):
                    children.append(len(tokens))
                    tokens.append(int(vocab[ix]))
                    parents.append(parent)
                    scores.append(base[f] + lp)
            frontier = sorted(children, key=lambda i: -scores[i])[: self.width]
            if depth == levels - 1 or math.exp(scores[frontier[0]]) * self.calibration() < self.min_prob:
                break
            base = [scores[i] for i in frontier]
            # one head pass over the new frontier: inputs [parent's feature ; token]
            parent_g = torch.stack([g[0] if parents[i] < 0 else g_of[parents[i]] for i in frontier]) \
                if depth else g.expand(len(frontier), -1)
            u = head.inputs(parent_g, torch.tensor([tokens[i] for i in frontier]))
            pos = torch.full((len(frontier),), b + 2 + depth)
            rope = head.rope(pos)
            q, kk, vv = head.project(u[None], (rope[0][None], rope[1][None]))
            sk = kk[0] if sk is None else torch.cat((sk, kk[0]))
            sv = vv[0] if sv is None else torch.cat((sv, vv[0]))
            expanded += frontier
            row_of = {node: i for i, node in enumerate(expanded)}
            mask = torch.zeros(len(frontier), len(real) + len(expanded), dtype=torch.bool)
            mask[:, : len(real)] = True
            for qi, node in enumerate(frontier):
                while node >= 0:
                    if node in row_of:
                        mask[qi, len(real) + row_of[node]] = True
                    node = parents[node]
            out = head.finish(u, head.attend(q[0], torch.cat((keys, sk)), torch.cat((values, sv)), mask))
            g_of.update({node: out[i] for i, node in enumerate(frontier)})
            logp = torch.log_softmax(head.logits(out).float(), dim=-1)
        # 3. the likeliest nodes that pay for their verification
        return self.choose(row, tokens, parents, scores, budget, len(context))


