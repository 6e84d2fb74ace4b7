"""Shared speculation test cases (imported by the per-drafter test files)."""
from __future__ import annotations

import torch

from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams


def run(engine, prompts, params, drafter=None):
    """Generate to the end; returns the batch rows."""
    return engine.start(prompts, params, drafter).run()


def greedy_equals_vanilla_on_ragged_batch(folder, drafter):
    """Three ragged prompts built from a repeated 6-gram (so copy drafters find matches), an EOS id and
    three max_tokens. Asserts the drafter's greedy output and finish reasons equal vanilla's and that it
    took no more target passes; returns ``(vanilla_rows, spec_rows)`` for drafter-specific checks."""
    engine = Engine(build_model(folder), eos_token_ids=[2])
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, 128, (6,), generator=gen).tolist()
    prompts = [base * 4, torch.randint(3, 128, (9,), generator=gen).tolist() + base * 2, base[:3] * 5]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 17, 25)]
    vanilla = run(engine, prompts, params)
    spec = run(engine, prompts, params, drafter)
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in vanilla]
    assert sum(r.target_passes for r in spec) <= sum(r.target_passes for r in vanilla)
    return vanilla, spec


def hot_start_int8_exact(folder, drafter):
    """Three rounds of the same two prompts with one ``drafter`` on int8 weights: every round equals int8
    vanilla bit for bit, and a hot round (the drafter learnt the rounds before) takes fewer target passes
    than the cold first one (one hot round can lose to it: on a tiny random model the statistics the
    first round leaves can also crowd out a continuation it later needs)."""
    from leaplm.quant import quantize_model

    engine = Engine(quantize_model(build_model(folder), "int8"), eos_token_ids=[2])
    prompts = [[7, 8, 9, 10, 11] * 3, [20, 21, 22] * 4]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (24, 18)]
    vanilla = run(engine, prompts, params)
    rounds = [run(engine, prompts, params, drafter) for _ in range(3)]
    for rows in rounds:
        assert [r.output_ids for r in rows] == [r.output_ids for r in vanilla]
    passes = [sum(r.target_passes for r in rows) for rows in rounds]
    assert min(passes[1:]) < passes[0], passes


def sampled_runs_are_reproducible(folder, make_drafter):
    """Seeded sampling through a fresh ``make_drafter()`` twice: it drafts, honours max_tokens, and
    gives the same draws both times (the drafts, and so the random numbers verification consumes,
    depend only on the context and the drafter's state)."""
    engine = Engine(build_model(folder), eos_token_ids=[2])
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=20)]
    a = run(engine, [[4, 5, 6] * 4], params, make_drafter())
    b = run(engine, [[4, 5, 6] * 4], params, make_drafter())
    assert len(a[0].output_ids) == 20 and a[0].drafted > 0
    assert a[0].output_ids == b[0].output_ids
