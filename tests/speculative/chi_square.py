"""Chi-square goodness of fit for the sampling-losslessness tests, without scipy: the p-value is the
regularized upper incomplete gamma function, ``Q(df / 2, stat / 2)`` (``torch.special.gammaincc``)."""
from __future__ import annotations

import torch

ALPHA = 1e-3    # a distribution test fails when its p-value is below this (Bonferroni-split over several)


def p_value(stat: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom >= ``stat``); 1 for ``df = 0`` (a certain outcome)."""
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def statistic(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi-square of one multinomial sample ``counts`` against ``probs`` (same shape, flattened):
    cells expecting at least ``min_expected`` are tested one by one, the others pooled into one cell (or into
    the smallest tested cell when they expect too little together). A count in a cell of probability 0 is a
    certain failure: an impossible token (sequence) was drawn. Returns (statistic, degrees of freedom)."""
    counts, probs = counts.reshape(-1).double(), probs.reshape(-1).double()
    impossible = probs <= 0
    assert float(counts[impossible].sum()) == 0, (
        f"{int(counts[impossible].sum())} draws of what vanilla sampling never produces "
        f"(flat cells {(impossible & (counts > 0)).nonzero().flatten().tolist()})")
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    assert bool(big.any()), f"too few draws for a chi-square test: {int(counts.sum())}"
    obs, exp = counts[big], expected[big]
    pooled_obs, pooled_exp = counts[~big].sum(), expected[~big].sum()
    if pooled_exp >= min_expected:
        obs, exp = torch.cat([obs, pooled_obs[None]]), torch.cat([exp, pooled_exp[None]])
    elif pooled_exp > 0:
        i = int(exp.argmin())
        obs[i], exp[i] = obs[i] + pooled_obs, exp[i] + pooled_exp
    return float(((obs - exp) ** 2 / exp).sum()), int(obs.numel()) - 1   # one cell: (0, 0), nothing to test


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of ``counts`` (one multinomial sample) against ``probs``."""
    return p_value(*statistic(counts, probs))


def rows_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of independent samples, one per row of ``counts [R, V]``, each against its row of ``probs``
    (the rows' totals are fixed, not drawn): the rows' statistics and degrees of freedom add up."""
    stats = [statistic(c, p) for c, p in zip(counts, probs)]
    return p_value(sum(s for s, _ in stats), sum(df for _, df in stats))


def consecutive_pairs_p(counts: torch.Tensor, probs: torch.Tensor) -> list[float]:
    """P-values of the joint distribution of each pair of consecutive positions (t1, t2), (t2, t3), ... of
    ``counts [V] * L`` against ``probs``: each drafted position is tested with the token it follows, in far
    fewer cells than the whole joint distribution has, so with more power per sample."""
    length = counts.dim()
    out = []
    for i in range(length - 1):
        others = tuple(k for k in range(length) if k not in (i, i + 1))
        out.append(chi_square_p(counts.sum(others) if others else counts, probs.sum(others) if others else probs))
    return out
