"""Batching never changes a request's output: on the real SmolLM2 with quantized weights, greedy output of a
ragged batch (prompts of 2 to ~250 tokens in one ``LLM.generate`` call) equals each prompt run alone, with
and without speculation, eager and compiled.

Before rows were prefilled one by one, a padded ``[B, longest]`` prefill attended with another kernel tiling
than the row's own prefill and changed greedy output (3 of 4 prompts diverged within 20 tokens on int8).
"""
from __future__ import annotations

import pytest

from leaplm.sampling import SamplingParams

_STORY = ("In the heart of the ancient city, where narrow streets wind between stone houses older than memory, "
          "there lived a clockmaker who had never once been late. Every morning he opened his shop at seven, "
          "wound the great clock above the door, and greeted the baker across the street. One day, however, ")
PROMPTS = ["The capital of France is", _STORY * 4, "Hi", "Once upon a time", "def fib(n):"]


def _check(llm, max_tokens: int, methods=("prompt_lookup", "recycling")) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    lengths = [len(llm.encode(p)) for p in PROMPTS]
    assert min(lengths) <= 3 and max(lengths) >= 200, lengths       # very different lengths in one batch
    alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in PROMPTS]
    assert all(len(a) > 0 for a in alone)
    together = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in together] == alone
    # speculation: the same tokens again, batched (a chain drafter and a tree drafter)
    for method in methods:
        spec = llm.generate(PROMPTS, params, use_tqdm=False, speculative=method)
        assert [o.token_ids for o in spec] == alone, method


@pytest.mark.real
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_ragged_batch_equals_each_prompt_alone_eager(smollm_gguf, quantization):
    from leaplm import LLM

    _check(LLM(str(smollm_gguf), quantization=quantization, goodput=False), max_tokens=32,
           methods=("prompt_lookup", "recycling") if quantization == "int8" else ("recycling",))


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_ragged_batch_equals_each_prompt_alone_compiled(smollm_gguf, quantization):
    from leaplm import LLM

    _check(LLM(str(smollm_gguf), quantization=quantization, compile=True, goodput=False), max_tokens=40)


def test_a_requests_keys_do_not_depend_on_what_shares_its_pass(tiny_model_dir):
    """Unit check of the mechanism on a tiny int8 model: a request prefilled alone, or in one pass with another
    request's prompt chunk, holds bit-identical keys and values, and its first token's logits match."""
    import torch

    from leaplm.engine import LLMEngine
    from leaplm.models.load import build_model
    from leaplm.quant import quantize_model

    model = quantize_model(build_model(tiny_model_dir("llama-gqa-untied")[0]), "int8")
    short, long = [5, 6, 7, 9, 11], list(range(3, 120))
    p = SamplingParams(temperature=0, max_tokens=8)
    sizes = []
    forward = model.forward_paged

    def spy(tokens, *args, **kwargs):
        sizes.append(len(tokens))
        return forward(tokens, *args, **kwargs)

    def first_step(prompts):
        engine = LLMEngine(model, eos_token_ids=[2], block_size=4)
        batch = engine.start(prompts, [p] * len(prompts))
        batch.step()
        row = len(prompts) - 1
        return batch.rows[row].output_ids, [batch.committed_kv(row, layer) for layer in range(model.config.num_layers)]

    model.forward_paged = spy
    try:
        ids_both, kv_both = first_step([long, short])
        assert sizes == [len(long) + len(short)]          # one flat pass, no padding
        ids_alone, kv_alone = first_step([short])
    finally:
        model.forward_paged = forward
    assert ids_both == ids_alone
    for (k1, v1), (k2, v2) in zip(kv_both, kv_alone):
        assert k1.shape[2] == len(short) and torch.equal(k1, k2) and torch.equal(v1, v2)
