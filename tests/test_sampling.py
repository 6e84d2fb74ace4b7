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
    # values Python lets through as numbers (bool is an int) or that failed later with a traceback
    (dict(seed=True), r"seed=True: must be None or an integer in \[0, 2\*\*64 - 1\]"),
    (dict(seed=2 ** 64), r"seed=18446744073709551616: .*\[0, 2\*\*64 - 1\]"),
    (dict(seed=-1), r"seed=-1: .*\[0, 2\*\*64 - 1\]"), (dict(seed=1.5), "seed=1.5"),
    (dict(stop=[1]), r"stop=\[1\]: must be a string or a list of strings"),
    (dict(stop=["a", b"b"]), "stop=.*list of strings"), (dict(stop=5), "stop=5"),
    (dict(stop_token_ids=[True]), r"stop_token_ids=\[True\]: must be a list of non-negative integers"),
    (dict(stop_token_ids=7), "stop_token_ids=7"), (dict(stop_token_ids=[2.0]), "stop_token_ids"),
    (dict(temperature=1e-45), r"temperature=1e-45: must be 0 \(greedy\) or at least 1e-05.*temperature=0"),
    (dict(temperature=9.9e-6), "temperature=9.9e-06: must be 0"), (dict(temperature=True), "temperature=True"),
    (dict(max_tokens=True), "max_tokens=True: must be an integer >= 1"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(top_k=True), "top_k=True: must be an integer"), (dict(top_p=True), "top_p=True"),
    (dict(ignore_eos="no"), "ignore_eos='no': must be True or False"),
    (dict(skip_special_tokens=None), "skip_special_tokens"), (dict(include_stop_str_in_output=1), "include_stop"),
])
def test_bad_values_are_refused_with_the_field_named(kw, field):
    with pytest.raises(InvalidParamsError, match=field):
        SamplingParams(**kw)


def test_edge_values_are_accepted_and_normalized():
    import numpy as np

    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=2 ** 64 - 1).seed == 2 ** 64 - 1
    p = SamplingParams(seed=np.int64(7), top_k=np.int32(5), max_tokens=np.uint16(9), stop_token_ids=(np.int64(3),))
    assert (p.seed, p.top_k, p.max_tokens, p.stop_token_ids) == (7, 5, 9, [3])
    assert all(type(v) is int for v in (p.seed, p.top_k, p.max_tokens, *p.stop_token_ids))
    assert SamplingParams(stop="").stop == [] and SamplingParams(stop=("", "\n\n")).stop == ["\n\n"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(temperature=1e-5).temperature == 1e-5 and SamplingParams(temperature=0).greedy


def test_the_smallest_temperature_gives_a_finite_distribution_on_large_logits():
    """At ``MIN_TEMPERATURE`` logits of magnitude 1e4 (far beyond a real model's) still give finite
    probabilities, and the draw is the argmax; 1e-45 (now refused) gave NaN probabilities and a traceback."""
    from leaplm.sampling import MIN_TEMPERATURE

    logits = _logits() * 3000
    params = SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.9, min_p=0.1)
    probs = probabilities(logits, params, None)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.equal(sample(logits, params, None, make_generator(0, "cpu")), logits.argmax(-1))
    assert torch.isnan((logits / 1e-45).softmax(-1)).any()   # what the refused value would have produced


def test_generator_seeds_cover_64_bits_and_wrap_derived_seeds():
    """Seeds in [0, 2**64 - 1] each give their own stream; a derived seed past the range (the draft model
    draws with ``seed + 1``) wraps modulo 2**64 instead of overflowing torch's ``manual_seed``."""
    def draws(seed):
        return torch.rand(4, generator=make_generator(seed, "cpu"))

    assert torch.equal(draws(2 ** 64), draws(0)) and torch.equal(draws(2 ** 64 + 5), draws(5))
    assert not torch.equal(draws(2 ** 64 - 1), draws(0)) and not torch.equal(draws(1), draws(0))


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
