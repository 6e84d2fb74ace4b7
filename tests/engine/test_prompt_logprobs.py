"""``SamplingParams(prompt_logprobs=k)``: every prompt token's log-probability (and the k likeliest) as the model
computed it while prefilling — equal to transformers' log-softmax of the same positions, however the prompt is chunked,
never taken from the prefix cache, recorded once through preemption."""
from __future__ import annotations

import pytest
import torch

from leaplm import SamplingParams
from leaplm.engine import LLMEngine
from leaplm.engine.kv_pool import KVPool
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model


def _run(engine, prompts, k=0):
    rids = [engine.add_request(p, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [engine.get_request(r) for r in rids]


def test_prompt_logprobs_match_transformers(tiny_model_dir):
    folder, hf = tiny_model_dir("llama-gqa-untied")
    model = build_model(folder)
    prompt = torch.randint(3, 128, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)   # [T, V]
    engine = LLMEngine(model, eos_token_ids=[], block_size=4, prefill_chunk=7)
    (r,) = _run(engine, [prompt], k=3)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(prompt)
    got = torch.tensor([x.logprob for x in r.prompt_logprobs[1:]])
    ref = want[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    for j in (1, 20, 44):
        assert [i for i, _ in r.prompt_logprobs[j].top] == want[j - 1].topk(3).indices.tolist()
    # the same prompt again: computed again (no prefix-cache hit), the same numbers
    (again,) = _run(engine, [prompt], k=3)
    assert again.cached_tokens == 0
    assert [x.logprob for x in again.prompt_logprobs[1:]] == [x.logprob for x in r.prompt_logprobs[1:]]


def test_prompt_logprobs_through_preemption(tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (60,), generator=gen).tolist() for _ in range(4)]
    alone = [_run(LLMEngine(model, eos_token_ids=[], block_size=4), [p])[0].prompt_logprobs for p in prompts]
    small = LLMEngine(model, eos_token_ids=[], block_size=4, prefill_chunk=16,
                      kv_cache_memory=100 * KVPool.bytes_per_token(model.config))
    got = _run(small, prompts)
    assert small.scheduler.preemptions > 0
    for r, want in zip(got, alone):
        assert len(r.prompt_logprobs) == len(want)
        assert [x.logprob for x in r.prompt_logprobs[1:]] == pytest.approx([x.logprob for x in want[1:]], abs=1e-5)


def test_prompt_logprobs_values_are_checked():
    with pytest.raises(InvalidParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
