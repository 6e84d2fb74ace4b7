"""Prompt lookup inside the engine: greedy output identical to vanilla; drafts actually accepted."""
from __future__ import annotations

import pytest

from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import Draft, Drafter, PromptLookup, make_drafter

from .cases import greedy_equals_vanilla_on_ragged_batch
from .cases import run as _run


def test_lookup_proposes_the_latest_earlier_continuation():
    d = PromptLookup(num_draft=3, max_ngram=2)
    assert d.propose(0, [5, 6, 7, 8, 1, 5, 6], 3).tokens == [7, 8, 1]
    assert d.propose(0, [5, 6, 7, 8, 1, 5, 6, 9], 3).tokens == []  # (6, 9) and (9,) never seen before
    d.reset(0)
    assert d.propose(0, [1, 2, 1, 2, 1], 2).tokens == [2, 1]  # latest match wins, not the first
    assert d.propose(1, [4], 2).tokens == []


def test_a_rolled_back_context_is_indexed_as_if_fresh():
    """A caller that rolls the context back (draft_model's staged chains do between rounds) gets the index
    a fresh drafter would build for the new context: rejected tokens leave no n-grams behind."""
    import random

    rng = random.Random(3)
    rolled, fresh = PromptLookup(num_draft=4), PromptLookup(num_draft=4)
    context = [rng.randrange(6) for _ in range(30)]
    for _ in range(40):
        keep = rng.randrange(len(context) + 1)
        context = context[:keep] + [rng.randrange(6) for _ in range(rng.randrange(1, 6))]
        fresh.reset(0)
        assert rolled.propose(0, context, 4).tokens == fresh.propose(0, context, 4).tokens
        assert rolled._index[0] == fresh._index[0]
    assert rolled.propose(0, [1, 2, 3, 1, 2], 3).tokens == [3, 1, 2]   # an unrelated context: a new index


def test_bad_knobs_are_refused():
    with pytest.raises(InvalidParamsError, match="num_draft"):
        PromptLookup(num_draft=0)
    with pytest.raises(InvalidParamsError, match="unknown speculative method"):
        make_drafter("telepathy")


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3", "qwen2-bias"])
def test_greedy_prompt_lookup_equals_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], PromptLookup(num_draft=5, max_ngram=3))
    assert sum(r.drafted for r in spec) > 0


def test_penalties_and_stop_ids_inside_accepted_drafts(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    engine = Engine(build_model(folder))
    prompt = [7, 8, 9, 10] * 6
    vanilla = _run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3)])[0]
    spec = _run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3)],
                PromptLookup(num_draft=4))[0]
    assert spec.output_ids == vanilla.output_ids
    plain = _run(engine, [prompt], [SamplingParams(temperature=0, max_tokens=20)])[0]
    stop = plain.output_ids[5]  # a token the unpenalized greedy run is known to produce
    p = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop])
    a, b = _run(engine, [prompt], [p])[0], _run(engine, [prompt], [p], PromptLookup(num_draft=4))[0]
    assert a.output_ids == b.output_ids and b.output_ids[-1] == stop and b.finish_reason == "stop"


class _Fixed(Drafter):
    """Always proposes the same tokens (deterministic q), whatever the context."""

    def __init__(self, tokens):
        self.tokens, self.num_draft = tokens, len(tokens)

    def propose(self, row, context, k):
        return Draft(self.tokens[:k])


def test_seeded_sampling_is_reproducible_with_and_without_drafts(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    engine = Engine(build_model(folder))
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=12)
    prompt = [5, 6, 7, 8] * 5
    assert _run(engine, [prompt], [p])[0].output_ids == _run(engine, [prompt], [p])[0].output_ids
    a = _run(engine, [prompt], [p], _Fixed([5, 6, 7]))[0]
    b = _run(engine, [prompt], [p], _Fixed([5, 6, 7]))[0]
    assert a.output_ids == b.output_ids and len(a.output_ids) == 12 and a.drafted > 0


@pytest.mark.real
def test_prompt_lookup_is_exact_on_spec_bench_style_prompts(smollm_gguf):
    from leaplm import LLM

    llm = LLM(str(smollm_gguf))
    spec = LLM(str(smollm_gguf), speculative={"method": "prompt_lookup", "num_draft": 8})
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.")
    prompts = [[{"role": "user", "content": f"Summarize: {text}"}],
               [{"role": "user", "content": f"Repeat exactly: {text}"}],
               [{"role": "user", "content": "Write a Python function that adds two numbers, then call it."}]]
    params = SamplingParams(temperature=0, max_tokens=64)
    ref = llm.chat(prompts, params, use_tqdm=False)
    out = spec.chat(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert sum(o.metrics["accepted"] for o in out) > 0
    assert sum(o.metrics["target_passes"] for o in out) < sum(o.metrics["target_passes"] for o in ref)
