"""Chain verification, no model: exact cases, and the output distribution equals the target's."""
from __future__ import annotations

import pytest
import torch

from leaplm.sampling import SamplingParams, TokenHistory, probabilities
from leaplm.speculative.verify import target_probabilities, verify_greedy, verify_sampling

from .chi_square import ALPHA, rows_p

V = 5

pytestmark = pytest.mark.usefixtures("single_thread")   # loops of tiny ops (tests/speculative/conftest.py)


def test_greedy_accepts_the_matching_prefix_then_the_target_token():
    assert verify_greedy([3, 1, 4], [3, 1, 2, 0]).tokens == [3, 1, 2]
    assert verify_greedy([3, 1, 4], [3, 1, 4, 0]).tokens == [3, 1, 4, 0]
    v = verify_greedy([3, 1, 4], [2, 1, 4, 0])
    assert v.tokens == [2] and v.accepted == 0
    assert verify_greedy([], [7]).tokens == [7]


def test_sampling_exact_cases():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_sampling([1], p, None, torch.Generator().manual_seed(0)).tokens == [1, 2]  # p(x)=1: accept
    v = verify_sampling([0], p, None, torch.Generator().manual_seed(0))
    assert v.tokens == [1] and v.accepted == 0  # p(x)=0: reject, resample from p without x
    q = torch.tensor([[0.5, 0.5, 0.0]])
    p2 = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    for seed in range(20):  # p == q: always accepted
        assert verify_sampling([seed % 2], p2, q, torch.Generator().manual_seed(seed)).accepted == 1
    with pytest.raises(ValueError, match="k \\+ 1"):
        verify_sampling([1, 2], p, None, None)


def _toy_target(context: tuple[int, ...], gen_seed: int = 0) -> torch.Tensor:
    """Logits of a toy 'model' over V tokens that depend on the last token."""
    table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(gen_seed)) * 1.5
    return table[context[-1] if context else V]


def _toy_draft(context: tuple[int, ...]) -> torch.Tensor:
    table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(99))
    return table[context[-1] if context else V].softmax(-1)


def _exact_pair_distribution(params: SamplingParams) -> torch.Tensor:
    """P(first two generated tokens) under vanilla sampling from the processed target, [V, V]."""
    history = TokenHistory(V, [], "cpu")
    p1 = probabilities(_toy_target(())[None], params, history)[0]
    out = torch.zeros(V, V)
    for a in range(V):
        h = TokenHistory(V, [], "cpu")
        h.add([a])
        out[a] = p1[a] * probabilities(_toy_target((a,))[None], params, h)[0]
    return out


def first_two(tokens: list[int], params: SamplingParams, gen: torch.Generator) -> list[int]:
    """The first two output tokens: a verdict of one token (rejected at the first position) is
    continued by vanilla sampling from the toy target."""
    if len(tokens) >= 2:
        return tokens[:2]
    h = TokenHistory(V, [], "cpu")
    h.add(tokens)
    nxt = probabilities(_toy_target(tuple(tokens))[None], params, h)[0]
    return tokens + [int(torch.multinomial(nxt, 1, generator=gen))]


def _chi_square(counts: torch.Tensor, expected_probs: torch.Tensor, n: int) -> tuple[float, int]:
    expected = expected_probs.flatten() * n
    keep = expected > 5
    observed = counts.flatten()
    assert observed[~keep].sum() <= 5 + expected[~keep].sum() * 3  # no mass where the target has ~none
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


# chi-square critical values at p = 0.001 by degrees of freedom (the draws are seeded: no flakiness)
CRITICAL = dict(enumerate([10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91,
                            34.53, 36.12, 37.70, 39.25, 40.79, 42.31, 43.82, 45.31, 46.80, 48.27, 49.73, 51.18], 1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.2, top_p=0.8, presence_penalty=0.7),
])
@pytest.mark.parametrize("deterministic_drafter", [False, True])
def test_speculative_sampling_reproduces_the_target_distribution(params, deterministic_drafter):
    """Draft 2 tokens from q (or greedily from q), verify, and count the first two output tokens."""
    n = 6000
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V, V)
    for _ in range(n):
        draft, qs, ctx = [], [], ()
        for _ in range(2):
            q = _toy_draft(ctx)
            x = int(q.argmax()) if deterministic_drafter else int(torch.multinomial(q, 1, generator=gen))
            draft.append(x)
            qs.append(q)
            ctx = ctx + (x,)
        logits = torch.stack([_toy_target(()), _toy_target((draft[0],)), _toy_target((draft[1],))])
        p = target_probabilities(logits, params, TokenHistory(V, [], "cpu"), draft)
        verdict = verify_sampling(draft, p, None if deterministic_drafter else torch.stack(qs), gen)
        tokens = first_two(verdict.tokens, params, gen)
        counts[tokens[0], tokens[1]] += 1
    stat, df = _chi_square(counts, _exact_pair_distribution(params), n)
    assert stat < CRITICAL[df], (stat, df)


def test_a_wrong_verifier_is_caught_by_the_same_test():
    """Accepting every draft token (ignoring p) must fail the chi-square check."""
    params = SamplingParams(temperature=1.0)
    n, gen = 6000, torch.Generator().manual_seed(7)
    counts = torch.zeros(V, V)
    for _ in range(n):
        a = int(torch.multinomial(_toy_draft(()), 1, generator=gen))
        b = int(torch.multinomial(_toy_draft((a,)), 1, generator=gen))
        counts[a, b] += 1
    stat, df = _chi_square_loose(counts, _exact_pair_distribution(params), n)
    assert stat > CRITICAL[df]


def _chi_square_loose(counts, expected_probs, n):
    expected = expected_probs.flatten() * n
    keep = expected > 5
    return float(((counts.flatten()[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def _close_draft(context: tuple[int, ...]) -> torch.Tensor:
    """A draft distribution that resembles the target's, as a real draft model's does: sharper than it (so
    it over-proposes the target's likely tokens, where the acceptance ratio p / q < 1 matters), with noise."""
    noise = torch.randn(V, generator=torch.Generator().manual_seed(99 + (context[-1] if context else V)))
    return (2.0 * _toy_target(context) + 0.5 * noise).softmax(-1)


def _one_position(params: SamplingParams, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per context (each last token, then none), the processed target ``p`` and the draft's ``q`` (one-hot at
    q's argmax for a deterministic drafter), ``[V + 1, V]`` each."""
    ps, qs = [], []
    for ctx in [(c,) for c in range(V)] + [()]:
        ps.append(target_probabilities(_toy_target(ctx)[None], params, TokenHistory(V, [], "cpu"), [])[0])
        q = _close_draft(ctx)
        qs.append(torch.nn.functional.one_hot(q.argmax(), V).float() if deterministic else q)
    return torch.stack(ps), torch.stack(qs)


def _inflated(p: torch.Tensor, q: torch.Tensor, factor: float) -> torch.Tensor:
    """The exact output distribution of a one-token verdict that accepts with min(1, factor * p / q) and
    otherwise draws from norm(max(0, p - q)) (from p when that is empty); factor 1 gives p."""
    accept = torch.minimum(q, factor * p)
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else p
    return accept + (1 - accept.sum()) * residual


# One-token drafts, verdicts counted per context, each context's counts against its own p. Each p is sharp
# (temperature < 1, or cut by top-k / top-p) and q over-proposes its likely tokens, so an acceptance rule
# inflated by 11% moves ~0.11 p(x) of mass where p(x) is large: the chi-square noncentrality is ~0.1 per
# verdict of every context together, ~80 for the 800 verdicts per context below, where p = 0.001 needs
# ~45 (measured with that bug planted in verify_sampling / verify_tree_sampling: p-values 1e-10 and less,
# here and in test_verify_tree). test_the_token_by_token_test_sees_an_11_percent_acceptance_inflation
# checks the power against the exact inflated distribution.
ONE_POSITION = [(SamplingParams(temperature=0.7, top_p=0.9), False), (SamplingParams(temperature=1.3, top_k=4), False),
                (SamplingParams(temperature=0.7, top_p=0.9), True), (SamplingParams(temperature=1.0), True)]
ONE_POSITION_IDS = ["T0.7-top_p-q", "T1.3-top_k-q", "T0.7-top_p-onehot", "T1-onehot"]
VERDICTS = 800   # per context


@pytest.mark.parametrize("params,deterministic", ONE_POSITION, ids=ONE_POSITION_IDS)
def test_speculative_sampling_reproduces_the_target_distribution_token_by_token(params, deterministic):
    """verify_sampling on one-token drafts drawn from q (or q's argmax), 800 verdicts per context: each
    context's first output token is distributed as its processed target p (chi-square p-value > ALPHA)."""
    p, q = _one_position(params, deterministic)
    gen = torch.Generator().manual_seed(99)
    counts = torch.zeros(V + 1, V)
    for c in range(V + 1):
        for x in torch.multinomial(q[c], VERDICTS, replacement=True, generator=gen).tolist():
            verdict = verify_sampling([x], p[c: c + 1].expand(2, -1), None if deterministic else q[c: c + 1], gen)
            counts[c, verdict.tokens[0]] += 1
    pvalue = rows_p(counts, p)
    assert pvalue > ALPHA, f"p-value {pvalue:.3g}: the first output token is not distributed as p"


@pytest.mark.parametrize("params,deterministic", ONE_POSITION, ids=ONE_POSITION_IDS)
def test_the_token_by_token_test_sees_an_11_percent_acceptance_inflation(params, deterministic):
    """The test above has the power it claims: counts drawn from the exact output of a verifier that accepts
    with min(1, 1.11 p / q) fail it by far."""
    p, q = _one_position(params, deterministic)
    assert torch.allclose(torch.stack([_inflated(p[c], q[c], 1.0) for c in range(V + 1)]), p, atol=1e-6)
    gen = torch.Generator().manual_seed(5)
    counts = torch.stack([torch.bincount(torch.multinomial(_inflated(p[c], q[c], 1.11), VERDICTS, replacement=True,
                                                           generator=gen), minlength=V) for c in range(V + 1)])
    assert rows_p(counts, p) < 1e-6


def test_target_probabilities_extend_the_history_with_the_draft():
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0)
    logits = torch.zeros(3, V)
    p = target_probabilities(logits, params, TokenHistory(V, [], "cpu"), [2, 2])
    assert torch.allclose(p[0], torch.full((V,), 1 / V))
    assert p[1, 2] < p[0, 2] and p[2, 2] < p[1, 2]  # penalized once, then twice
