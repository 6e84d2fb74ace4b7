"""StreamingLLM against an independent oracle: transformers decoding token by token over a cache that keeps the
sinks and the recent window, positions every token by its slot in that cache, and — when the cache reaches
``sinks + window + evict`` — drops the ``evict`` tokens after the sinks and re-rotates the keys that remain
(transformers' own rotary code). leaplm (paged blocks dropped whole, prompts longer than the window prefilled in
chunks capped at the eviction points, speculation) must give the same tokens, past the model's context window, in
bounded memory."""
from __future__ import annotations

import pytest
import torch

from leaplm.errors import InvalidParamsError, PromptTooLongError
from leaplm.models.load import build_model
from leaplm.speculative.drafters import PromptLookup

from ...engine_helpers import Oracle
from .helpers import generate


def hf_streaming(hf, prompt: list[int], sinks: int, window: int, evict: int, n: int) -> list[int]:
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import rotate_half

    limit = sinks + window + evict
    rotary = hf.model.rotary_emb
    cache = DynamicCache(config=hf.config)
    out_tokens: list[int] = []
    feed = list(prompt)
    with torch.no_grad():
        while len(out_tokens) < n:
            token = feed.pop(0) if feed else out_tokens[-1]
            held = cache.get_seq_length()
            out = hf(torch.tensor([[token]]), cache=cache, use_cache=True, position_ids=torch.tensor([[held]]),
                     cache_position=torch.tensor([held]))
            if not feed:
                out_tokens.append(int(out.logits[0, -1].argmax()))
            if cache.get_seq_length() == limit:   # evict, re-rotate by -evict
                x = torch.zeros(1, 1, hf.config.hidden_size // hf.config.num_attention_heads)
                cos, sin = rotary(x, torch.tensor([[evict]]))
                cos, sin = cos[0, 0], sin[0, 0]
                for entry in cache.layers:
                    keys = torch.cat((entry.keys[:, :, :sinks], entry.keys[:, :, sinks + evict:]), 2)
                    kept = keys[:, :, sinks:]
                    keys[:, :, sinks:] = kept * cos - rotate_half(kept) * sin
                    entry.keys = keys
                    entry.values = torch.cat((entry.values[:, :, :sinks], entry.values[:, :, sinks + evict:]), 2)
    return out_tokens


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SPEC = "streaming_llm:sinks=3,window=13,evict=8"   # limit 24 slots; evictions of 2 blocks of 4


@pytest.mark.parametrize("family", ["llama-gqa-untied", "qwen2-bias"])
@pytest.mark.parametrize("prompt_len", [10, 61])
def test_streaming_matches_transformers_oracle(family, prompt_len, tiny_model_dir):
    folder, hf = tiny_model_dir(family)
    model = build_model(folder)
    prompt = _prompt(prompt_len, prompt_len)
    want = hf_streaming(hf, prompt, 3, 13, 8, n=50)
    got, r = generate(model, prompt, SPEC, max_tokens=50, prefill_chunk=7)
    assert got == want
    assert r.peak_kv_blocks <= 24 // 4 + 1


def test_streaming_runs_past_the_context_window(tiny_model_dir):
    """The tiny models' context is 256 positions: 300 tokens after a 280-token prompt, memory bounded."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(280, 5)
    with pytest.raises(PromptTooLongError):
        generate(model, prompt, None, max_tokens=10)
    out, r = generate(model, prompt, "streaming_llm:sinks=4,window=52,evict=8", max_tokens=300)
    assert len(out) == 300
    assert r.kv_shift > 500 and r.peak_kv_blocks <= 64 // 4 + 1


def test_streaming_is_exact_when_nothing_is_evicted(tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(30, 6)
    assert generate(model, prompt, "streaming_llm:window=100,evict=8", max_tokens=40)[0] == \
        generate(model, prompt, None, max_tokens=40)[0]


@pytest.mark.parametrize("tree", [False, True])
def test_streaming_speculation_is_token_identical(tree, tiny_model_dir):
    """Drafts never cross an eviction point (the scheduler caps them), so verification sees exactly the cache plain
    decoding sees: every rollback length and tree compaction give the policy's plain output."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(20, 7)
    plain, _ = generate(model, prompt, SPEC, max_tokens=80)
    oracle = Oracle([prompt + plain], num_draft=5, tree=tree)
    spec, r = generate(model, prompt, SPEC, max_tokens=80, speculative=oracle, goodput=False)
    assert spec == plain
    assert r.accepted > 10
    assert generate(model, prompt, SPEC, max_tokens=80, speculative=PromptLookup())[0] == plain


def test_streaming_is_checked(tiny_model_dir):
    from leaplm.cache.policies import parse_kv_policy

    with pytest.raises(InvalidParamsError, match="multiple of the KV block size"):
        generate(build_model(tiny_model_dir("llama-gqa-untied")[0]), [5, 6, 7], "streaming_llm:window=40,evict=6")
    with pytest.raises(InvalidParamsError, match="context"):
        generate(build_model(tiny_model_dir("llama-gqa-untied")[0]), [5, 6, 7], "streaming_llm:window=400")
    with pytest.raises(InvalidParamsError, match="sliding-window"):
        generate(build_model(tiny_model_dir("gemma3")[0]), [5, 6, 7], "streaming_llm:window=40")
    with pytest.raises(InvalidParamsError, match="sinks"):
        parse_kv_policy("streaming_llm:sinks=-1")


def test_streaming_prompt_logprobs_match_the_oracle(tiny_model_dir):
    """Teacher-forced under the policy (``prompt_logprobs``, how ``leaplm eval longppl`` scores a stream): each prompt
    token's log-probability equals the oracle's, 300 tokens into a 256-position model."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import rotate_half

    from leaplm import SamplingParams
    from leaplm.engine import LLMEngine

    folder, hf = tiny_model_dir("llama-gqa-untied")
    model = build_model(folder)
    prompt = _prompt(300, 9)
    sinks, window, evict = 3, 13, 8
    want = []
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        for j, token in enumerate(prompt[:-1]):
            held = cache.get_seq_length()
            out = hf(torch.tensor([[token]]), cache=cache, use_cache=True, position_ids=torch.tensor([[held]]),
                     cache_position=torch.tensor([held]))
            want.append(float(out.logits[0, -1].float().log_softmax(-1)[prompt[j + 1]]))
            if cache.get_seq_length() == sinks + window + evict:
                cos, sin = hf.model.rotary_emb(torch.zeros(1, 1, 16), torch.tensor([[evict]]))
                for entry in cache.layers:
                    keys = torch.cat((entry.keys[:, :, :sinks], entry.keys[:, :, sinks + evict:]), 2)
                    keys[:, :, sinks:] = keys[:, :, sinks:] * cos[0, 0] - rotate_half(keys[:, :, sinks:]) * sin[0, 0]
                    entry.keys = keys
                    entry.values = torch.cat((entry.values[:, :, :sinks], entry.values[:, :, sinks + evict:]), 2)
    engine = LLMEngine(model, eos_token_ids=[], block_size=4, prefill_chunk=11)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, kv_policy=SPEC))
    while engine.has_unfinished():
        engine.step()
    got = [x.logprob for x in engine.get_request(rid).prompt_logprobs[1:]]
    assert got == pytest.approx(want, abs=2e-4)
