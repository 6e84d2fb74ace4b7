"""Tree verification, no model: exact greedy cases, and recursive rejection sampling over siblings
reproduces the target distribution (deterministic siblings, and siblings drawn without replacement)."""
from __future__ import annotations

import pytest
import torch

from leaplm.sampling import SamplingParams, TokenHistory, probabilities
from leaplm.speculative.verify import target_probabilities, verify_tree_greedy, verify_tree_sampling

from .chi_square import ALPHA, rows_p
from .test_verify import (CRITICAL, ONE_POSITION, ONE_POSITION_IDS, V, VERDICTS, _chi_square, _chi_square_loose,
                          _exact_pair_distribution, _one_position, _toy_draft, _toy_target, first_two)

PARENTS = [-1, -1, 0, 0, 1, 2]   # root -> {0, 1}; 0 -> {2, 3}; 1 -> {4}; 2 -> {5}

pytestmark = pytest.mark.usefixtures("single_thread")   # loops of tiny ops (tests/speculative/conftest.py)


def test_greedy_follows_the_matching_branch():
    tokens = [10, 11, 12, 13, 14, 15]
    #                 root node0 node1 node2 node3 node4 node5
    v = verify_tree_greedy(tokens, PARENTS, [11, 9, 14, 9, 9, 9, 9])
    assert v.tokens == [11, 14, 9] and v.path == [1, 4] and v.accepted == 2
    v = verify_tree_greedy(tokens, PARENTS, [10, 12, 9, 15, 9, 9, 7])
    assert v.tokens == [10, 12, 15, 7] and v.path == [0, 2, 5]
    v = verify_tree_greedy(tokens, PARENTS, [3, 12, 9, 15, 9, 9, 7])
    assert v.tokens == [3] and v.path == [] and v.accepted == 0
    assert verify_tree_greedy([], [], [4]).tokens == [4]


def test_sampling_exact_cases():
    p = torch.tensor([[0.0, 0.0, 1.0]] + [[1.0, 0.0, 0.0]] * 2)
    # root children 0 (p=0, rejected) then 2 (p=1 after removing 0: accepted), then the bonus
    v = verify_tree_sampling([0, 2], [-1, -1], p, None, torch.Generator().manual_seed(0))
    assert v.tokens == [2, 0] and v.path == [1]
    v = verify_tree_sampling([0, 1], [-1, -1], p, None, torch.Generator().manual_seed(0))
    assert v.tokens == [2] and v.accepted == 0       # both rejected: the residual leaves only token 2
    with pytest.raises(ValueError, match="n \\+ 1"):
        verify_tree_sampling([0, 1], [-1, -1], p[:2], None, None)


def _without_replacement(q: torch.Tensor, count: int, gen: torch.Generator) -> list[int]:
    q = q.clone()
    out = []
    for _ in range(count):
        x = int(torch.multinomial(q / q.sum(), 1, generator=gen))
        out.append(x)
        q[x] = 0
    return out


def _sample_tree(gen, deterministic: bool, width: int):
    """Root gets ``width`` distinct children, each one child: a 2-level tree; returns tokens, parents, q."""
    q_root = _toy_draft(())
    firsts = q_root.topk(width).indices.tolist() if deterministic else _without_replacement(q_root, width, gen)
    tokens, parents, qs = list(firsts), [-1] * width, [q_root] * width
    for i, a in enumerate(firsts):
        q = _toy_draft((a,))
        tokens.append(int(q.argmax()) if deterministic else int(torch.multinomial(q, 1, generator=gen)))
        parents.append(i)
        qs.append(q)
    return tokens, parents, torch.stack(qs)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.2, top_p=0.8, presence_penalty=0.7),
])
@pytest.mark.parametrize("deterministic,width", [(True, 3), (False, 2), (False, 3)])
def test_recursive_rejection_sampling_reproduces_the_target_distribution(params, deterministic, width):
    n = 6000
    gen = torch.Generator().manual_seed(4321 + width)
    counts = torch.zeros(V, V)
    for _ in range(n):
        tokens, parents, qs = _sample_tree(gen, deterministic, width)
        feeds = [()] + [((tokens[p],) if p >= 0 else ()) + (t,) for t, p in zip(tokens, parents)]
        logits = torch.stack([_toy_target(ctx) for ctx in feeds])
        p = target_probabilities(logits, params, TokenHistory(V, [], "cpu"), tokens, parents)
        out = first_two(verify_tree_sampling(tokens, parents, p, None if deterministic else qs, gen).tokens,
                        params, gen)
        counts[out[0], out[1]] += 1
    stat, df = _chi_square(counts, _exact_pair_distribution(params), n)
    assert stat < CRITICAL[df], (stat, df)


def test_ignoring_without_replacement_is_caught():
    """Treating siblings drawn without replacement as if each came from the full q is biased."""
    params, n = SamplingParams(temperature=1.0), 6000
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(V, V)
    for _ in range(n):
        tokens, parents, qs = _sample_tree(gen, False, 3)
        feeds = [()] + [((tokens[p],) if p >= 0 else ()) + (t,) for t, p in zip(tokens, parents)]
        p = probabilities(torch.stack([_toy_target(ctx) for ctx in feeds]), params, None)
        out = first_two(_wrong_tree_verify(tokens, parents, p, qs, gen), params, gen)
        counts[out[0], out[1]] += 1
    stat, df = _chi_square_loose(counts, _exact_pair_distribution(params), n)
    assert stat > CRITICAL[df]


def _wrong_tree_verify(tokens, parents, p, qs, gen):
    """Root level only: each sibling against the *unreduced* q (the bug), then plain sampling."""
    residual = p[0]
    for c in [i for i, par in enumerate(parents) if par == -1]:
        x, q = tokens[c], qs[c]
        if float(torch.rand((), generator=gen)) < min(1.0, float(residual[x] / q[x])):
            return [x]
        left = (residual - q).clamp_min(0)
        residual = left / left.sum()
    return [int(torch.multinomial(residual, 1, generator=gen))]


@pytest.mark.parametrize("params,deterministic,width", [(*case, w) for case, w in zip(ONE_POSITION, (2, 3, 3, 2))],
                         ids=[f"{name}-{w}" for name, w in zip(ONE_POSITION_IDS, (2, 3, 3, 2))])
def test_recursive_rejection_sampling_reproduces_the_target_distribution_token_by_token(params, deterministic, width):
    """Siblings only (``width`` children of the root: q's likeliest tokens, or drawn from q without
    replacement), 800 verdicts per context of test_verify's one-position cases: each context's first output
    token is distributed as its processed target p (chi-square p-value > ALPHA). q resembles p and
    over-proposes its likely tokens, so every sibling's acceptance matters (a rule inflated by 11% fails)."""
    p, q = _one_position(params, False)
    gen = torch.Generator().manual_seed(7 + width)
    counts = torch.zeros(V + 1, V)
    for c in range(V + 1):
        for _ in range(VERDICTS):
            siblings = q[c].topk(width).indices.tolist() if deterministic else _without_replacement(q[c], width, gen)
            verdict = verify_tree_sampling(siblings, [-1] * width, p[c: c + 1].expand(width + 1, -1),
                                           None if deterministic else q[c: c + 1].expand(width, -1), gen)
            counts[c, verdict.tokens[0]] += 1
    pvalue = rows_p(counts, p)
    assert pvalue > ALPHA, f"p-value {pvalue:.3g}: the first output token is not distributed as p"
