"""Sampling: processed distributions equal transformers' processors; validation; reproducibility."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from leaplm.errors import InvalidParamsError
from leaplm.sampling import (SamplingParams, TokenHistory, apply_penalties, make_generator, probabilities,
                             processed_logits, sample)

V = 50


def _logits(seed=0, n=3):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7), dict(temperature=1.3, top_k=7), dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.0, min_p=0.1), dict(temperature=0.5, top_k=10, top_p=0.9, min_p=0.05),
])
def test_warping_matches_transformers(kw):
    logits = _logits()
    ours = processed_logits(logits, SamplingParams(**kw), None)
    ref = logits.clone()
    warpers = [TemperatureLogitsWarper(kw["temperature"])]
    if kw.get("top_k"):
        warpers.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        warpers.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        warpers.append(MinPLogitsWarper(kw["min_p"]))
    for w in warpers:
        ref = w(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_repetition_penalty_matches_transformers():
    logits = _logits()
    prompt, output = [3, 4, 5], [5, 9, 9]
    hist = TokenHistory(V, prompt, "cpu")
    hist.add(output)
    ours = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), hist)
    ids = torch.tensor([prompt + output] * logits.shape[0])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, V)
    hist = TokenHistory(V, [7], "cpu")  # prompt tokens are not penalized by presence/frequency
    hist.add([3, 3, 4])
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), hist)
    assert out[0, 3].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 4].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 7].item() == 0 and out[0, 0].item() == 0


def test_greedy_is_argmax_and_probabilities_one_hot():
    logits = _logits()
    p = SamplingParams(temperature=0)
    assert torch.equal(sample(logits, p, None, None), logits.argmax(-1))
    probs = probabilities(logits, p, None)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.all(probs.sum(-1) == 1)


def test_seeded_sampling_is_reproducible_and_matches_distribution():
    logits = _logits(n=1)
    p = SamplingParams(temperature=1.0, seed=1234)
    a = [int(sample(logits, p, None, make_generator(1234, "cpu"))) for _ in range(3)]
    b = [int(sample(logits, p, None, make_generator(1234, "cpu"))) for _ in range(3)]
    assert a == b
    gen = make_generator(5, "cpu")
    draws = torch.stack([sample(logits, SamplingParams(top_k=5), None, gen) for _ in range(4000)])
    expected = probabilities(logits, SamplingParams(top_k=5), None)[0]
    freq = torch.bincount(draws.flatten(), minlength=V).float() / draws.numel()
    assert set(draws.unique().tolist()) <= set(torch.topk(logits[0], 5).indices.tolist())
    assert (freq - expected).abs().max() < 0.03


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(temperature=math.nan), "temperature"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_values_are_refused_with_the_field_named(kw, field):
    with pytest.raises(InvalidParamsError, match=field):
        SamplingParams(**kw)


def test_top_ids_is_argmax_and_a_stable_topk_with_or_without_the_native_kernel(monkeypatch):
    """Verification's argmax and Token Recycling's candidates: the same ids from the native kernel (float32
    CPU, ops loaded) and from torch (any other input, or ops unavailable)."""
    from leaplm import native
    from leaplm.sampling import top_ids

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3000, generator=gen)
    x[2] = (x[2] * 3).round()
    reference = torch.sort(x, dim=-1, descending=True, stable=True).indices
    native.load()
    fast = top_ids(x, 8)
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.equal(top_ids(x, 1)[:, 0], x.argmax(-1))
    assert torch.equal(top_ids(x, 1), reference[:, :1])
    assert torch.equal(fast, reference[:, :8])
    assert torch.equal(top_ids(x.double(), 1)[:, 0], x.argmax(-1))       # not float32: torch
    untied = [0, 1, 3, 4, 5]                  # torch.topk: the same candidates where no tie straddles the cut
    assert torch.equal(top_ids(x, 8)[untied].sort(-1).values, fast[untied].sort(-1).values)
