"""Verification of a chain draft: pure functions of (draft, target distributions, rng) -> verdict.

The target scores ``k`` draft tokens in one pass, giving ``k + 1`` next-token distributions
(after the committed context, after draft[0], ..., after draft[k-1]). These functions decide
how many draft tokens survive and which one target token follows them (the correction at the
first rejection, or the bonus token when all are accepted), so every verdict yields
``accepted + 1`` new tokens.

- ``verify_greedy``: accept the longest prefix equal to the target's argmax, then the argmax.
- ``verify_sampling``: speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept
  draft token x with probability min(1, p(x) / q(x)); on rejection draw from
  norm(max(0, p - q)); when all are accepted draw the bonus from the last distribution. The
  output is distributed exactly as sampling from p, for any q. A deterministic drafter (no
  ``draft_probs``) is the one-hot q case: accept with probability p(x), resample from p with x
  removed.

``p`` must be the *processed* target distribution (``sampling.probabilities`` with the history
extended by the draft prefix: ``target_probabilities`` below), so that speculation reproduces
vanilla sampling with the same penalties, temperature, top-k/top-p/min-p.
Shapes: ``draft`` list of k ids; ``target_probs`` ``[k + 1, V]``; ``draft_probs`` ``[k, V]``.

Token trees (``parents``, see ``speculative/tree.py``; row f of the target arrays belongs to feed index f:
0 = the root, 1 + i = node i):
- ``verify_tree_greedy``: from the root, follow the child equal to the target's argmax while there
  is one; then the argmax.
- ``verify_tree_sampling``: recursive rejection sampling over siblings (Jeon et al. 2024, Recursive
  Speculative Decoding; SpecTr's k-sequential scheme). At a node with children c1..cm, try them in
  order against a residual target r (initially p): child c_i is accepted with probability
  min(1, r(x_i) / q_i(x_i)); on rejection r <- norm(max(0, r - q_i)). q_i is one-hot on x_i for a
  deterministic drafter, or the parent's draft distribution with c1..c_{i-1} removed and
  renormalized (siblings drawn without replacement). Each try is a speculative-sampling step, so
  the token leaving the node is distributed exactly as p; when every child is rejected it is drawn
  from the final residual. The chain verifier is the one-child case.

- ``verify_typical``: Medusa's typical acceptance, chains and trees: **lossy** (a drafter asks for it with
  ``typical``; the engine uses it for sampled requests only).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..sampling import SamplingParams, TokenHistory, probabilities, top_ids
from .tree import children, path_to


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]   # the accepted draft prefix followed by one target token
    accepted: int       # how many draft tokens were accepted (len(tokens) - 1)
    path: list[int] | None = None   # trees: the accepted node indices, root's child first

    @property
    def nodes(self) -> list[int]:
        """Accepted draft node indices (a chain's are 0..accepted-1)."""
        return self.path if self.path is not None else list(range(self.accepted))


def target_probabilities(logits: Tensor, params: SamplingParams, history: TokenHistory | None,
                         draft: Sequence[int], parents: Sequence[int] | None = None) -> Tensor:
    """``logits [k + 1, V]`` -> processed distributions ``[k + 1, V]``; row i sees ``draft[:i]`` as output
    (a tree's row 1 + i sees the tokens on the path to node i)."""
    if history is None or not params.uses_penalties:
        return probabilities(logits, params, None)
    rows = []
    if parents is not None:
        for f in range(logits.shape[0]):
            extended = copy.deepcopy(history)
            if f:
                extended.add([draft[i] for i in path_to(parents, f - 1)])
            rows.append(probabilities(logits[f: f + 1], params, extended))
        return torch.cat(rows)
    extended = copy.deepcopy(history)
    for i in range(logits.shape[0]):
        rows.append(probabilities(logits[i: i + 1], params, extended))
        if i < len(draft):
            extended.add([draft[i]])
    return torch.cat(rows)


def target_argmax(logits: Tensor, params: SamplingParams, history: TokenHistory | None,
                  draft: Sequence[int], parents: Sequence[int] | None = None) -> list[int]:
    """Greedy choices ``[k + 1]`` of the target; without penalties a plain argmax (the hot path)."""
    if history is None or not params.uses_penalties:
        return top_ids(logits, 1)[:, 0].tolist()
    return target_probabilities(logits, params, history, draft, parents).argmax(-1).tolist()


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """``target_argmax``: the k + 1 greedy choices of the (penalized) target."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == target_argmax[accepted]:
        accepted += 1
    return Verdict(list(draft[:accepted]) + [int(target_argmax[accepted])], accepted)


def verify_sampling(draft: Sequence[int], target_probs: Tensor, draft_probs: Tensor | None,
                    generator: torch.Generator | None) -> Verdict:
    """Speculative sampling over a chain; see the module docstring."""
    k = len(draft)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for a draft of {k} tokens (need k + 1)")
    uniforms = torch.rand(k, generator=generator, device=target_probs.device) if k else None
    for i, x in enumerate(draft):
        p = target_probs[i]
        q = draft_probs[i] if draft_probs is not None else None
        px = float(p[x])
        qx = float(q[x]) if q is not None else 1.0
        if qx > 0 and float(uniforms[i]) < min(1.0, px / qx):
            continue
        if q is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = (p - q).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0:  # p == q up to rounding: any draw from p is exact
            residual, total = p, float(p.sum())
        token = int(torch.multinomial(residual / total, 1, generator=generator))
        return Verdict(list(draft[:i]) + [token], i)
    bonus = int(torch.multinomial(target_probs[k], 1, generator=generator))
    return Verdict(list(draft) + [bonus], k)


def verify_tree_greedy(draft: Sequence[int], parents: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """``target_argmax [1 + n]``: the greedy choice after the root and after each node."""
    kids = children(parents)
    path: list[int] = []
    feed = 0
    while True:
        choice = int(target_argmax[feed])
        nxt = next((c for c in kids[feed] if draft[c] == choice), None)
        if nxt is None:
            return Verdict([draft[i] for i in path] + [choice], len(path), path)
        path.append(nxt)
        feed = nxt + 1


def verify_tree_sampling(draft: Sequence[int], parents: Sequence[int], target_probs: Tensor,
                         draft_probs: Tensor | None, generator: torch.Generator | None) -> Verdict:
    """Recursive rejection sampling down a token tree; ``target_probs [1 + n, V]``, ``draft_probs [n, V]``."""
    if target_probs.shape[0] != len(draft) + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for a tree of {len(draft)} nodes (need n + 1)")
    kids = children(parents)
    path: list[int] = []
    feed = 0
    while True:
        residual = target_probs[feed]
        q_parent = draft_probs[kids[feed][0]].clone() if draft_probs is not None and kids[feed] else None
        for c in kids[feed]:
            x = draft[c]
            if q_parent is None:
                q = torch.zeros_like(residual)
                q[x] = 1.0
            else:
                q = q_parent / q_parent.sum() if float(q_parent.sum()) > 0 else q_parent
            rx, qx = float(residual[x]), float(q[x])
            u = float(torch.rand((), generator=generator, device=residual.device))
            if qx > 0 and u < min(1.0, rx / qx):
                path.append(c)
                feed = c + 1
                break
            left = (residual - q).clamp_min(0.0)
            total = float(left.sum())
            # residual == q up to rounding: the remaining mass is gone, any draw from residual is exact
            residual = left / total if total > 0 else residual
            if q_parent is not None:
                q_parent[x] = 0.0   # the next sibling was drawn without replacement
        else:
            token = int(torch.multinomial(residual, 1, generator=generator))
            return Verdict([draft[i] for i in path] + [token], len(path), path)


def verify_typical(draft: Sequence[int], parents: Sequence[int] | None, target_probs: Tensor, threshold: float,
                   alpha: float, generator: torch.Generator | None) -> Verdict:
    """Medusa's typical acceptance (Cai et al. 2024, section 2.3.1), **lossy**: a node ``x`` is acceptable where the
    target's processed distribution ``p`` at its parent gives ``p(x) > min(threshold, alpha * exp(-H(p)))`` (``H`` the
    entropy in nats); the longest root-to-node path of acceptable nodes is accepted (the first found among equals)
    and the next token is sampled from ``p`` after it. ``parents`` None: a chain. ``target_probs [1 + n, V]``."""
    n = len(draft)
    if target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for a draft of {n} tokens (need n + 1)")
    tree = parents if parents is not None else list(range(-1, n - 1))
    p = target_probs.float()
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)                               # [1 + n]
    bar = torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))
    ok = [float(p[tree[i] + 1, x]) > float(bar[tree[i] + 1]) for i, x in enumerate(draft)]
    depth = [0] * n                  # accepted-path length ending at node i (0: not reachable)
    best = -1
    for i in range(n):               # topological order: a parent's depth is known before its children's
        if ok[i] and (tree[i] < 0 or depth[tree[i]]):
            depth[i] = 1 + (depth[tree[i]] if tree[i] >= 0 else 0)
            if best < 0 or depth[i] > depth[best]:
                best = i
    path: list[int] = []
    node = best
    while node >= 0:
        path.append(node)
        node = tree[node]
    path.reverse()
    feed = path[-1] + 1 if path else 0
    token = int(torch.multinomial(p[feed], 1, generator=generator))
    return Verdict([draft[i] for i in path] + [token], len(path), path if parents is not None else None)
