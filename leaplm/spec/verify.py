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
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..sampling import SamplingParams, TokenHistory, probabilities


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]   # the accepted draft prefix followed by one target token
    accepted: int       # how many draft tokens were accepted (len(tokens) - 1)


def target_probabilities(logits: Tensor, params: SamplingParams, history: TokenHistory | None,
                         draft: Sequence[int]) -> Tensor:
    """``logits [k + 1, V]`` -> processed distributions ``[k + 1, V]``; row i sees ``draft[:i]`` as output."""
    if history is None or not params.uses_penalties:
        return probabilities(logits, params, None)
    rows = []
    extended = copy.deepcopy(history)
    for i in range(logits.shape[0]):
        rows.append(probabilities(logits[i: i + 1], params, extended))
        if i < len(draft):
            extended.add([draft[i]])
    return torch.cat(rows)


def target_argmax(logits: Tensor, params: SamplingParams, history: TokenHistory | None,
                  draft: Sequence[int]) -> list[int]:
    """Greedy choices ``[k + 1]`` of the target; without penalties a plain argmax (the hot path)."""
    if history is None or not params.uses_penalties:
        return logits.argmax(-1).tolist()
    return target_probabilities(logits, params, history, draft).argmax(-1).tolist()


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
