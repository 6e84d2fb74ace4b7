"""Medusa's typical acceptance (lossy, ``verify.verify_typical``): which nodes pass the entropy-dependent bar, the
longest passing path wins, and the token after it is drawn from the target's distribution at that node."""
from __future__ import annotations

import math

import pytest
import torch

from leaplm.speculative.verify import verify_typical


def dist(*mass: float, v: int = 6) -> torch.Tensor:
    p = torch.zeros(v)
    p[: len(mass)] = torch.tensor(mass)
    return p / p.sum()


def test_a_chain_is_accepted_while_its_tokens_pass_the_bar():
    # peaked rows: the bar is min(0.09, 0.3 * exp(-H)); token 0 holds most of the mass, token 5 none
    probs = torch.stack([dist(0.9, 0.1), dist(0.8, 0.2), dist(0.95, 0.05), dist(0.0, 1.0)])
    v = verify_typical([0, 0, 5], None, probs, 0.09, 0.3, torch.Generator().manual_seed(0))
    assert v.accepted == 2 and v.tokens[:2] == [0, 0] and v.path is None
    assert v.tokens[2] in (0, 1)   # drawn from row 2 (after the two accepted tokens), which gives only 0 or 1


def test_the_bar_falls_with_the_entropy():
    flat = torch.full((1, 100), 0.01)   # H = ln 100: bar = min(0.09, 0.3 / 100) = 0.003 < 0.01: accepted
    v = verify_typical([7], None, torch.cat((flat, flat)), 0.09, 0.3, None)
    assert v.accepted == 1
    peaked = dist(0.95, 0.04, 0.01, v=100)[None]   # low entropy: bar = 0.09 > 0.04: token 1 rejected
    h = -(peaked[peaked > 0] * peaked[peaked > 0].log()).sum()
    assert min(0.09, 0.3 * math.exp(-float(h))) > 0.04
    v = verify_typical([1], None, torch.cat((peaked, peaked)), 0.09, 0.3, None)
    assert v.accepted == 0


def test_the_longest_passing_path_of_a_tree_wins():
    # nodes: 0 (tok 1) and 1 (tok 2) under the root; 2 (tok 3) under node 1; 3 (tok 4) under node 2
    parents = [-1, -1, 1, 2]
    root = dist(0.5, 0.25, 0.25)          # tokens 1 and 2 both pass
    after1 = dist(1.0)
    after2 = dist(0.0, 0.0, 0.0, 1.0)     # token 3
    after3 = dist(0.0, 0.0, 0.0, 0.0, 0.5, 0.5)
    after4 = dist(0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    probs = torch.stack([root, after1, after2, after3, after4])
    v = verify_typical([1, 2, 3, 4], parents, probs, 0.09, 0.3, None)
    assert v.path == [1, 2, 3] and v.tokens == [2, 3, 4, 5] and v.accepted == 3


def test_nothing_passes_and_the_token_comes_from_the_root():
    probs = torch.stack([dist(1.0), dist(0.0, 1.0)])
    v = verify_typical([3], None, probs, 0.09, 0.3, None)
    assert v.accepted == 0 and v.tokens == [0]
    with pytest.raises(ValueError, match="need n \\+ 1"):
        verify_typical([3, 4], None, probs, 0.09, 0.3, None)
