"""KV policies inside the continuous-batching engine: requests with different policies (and none) side by side,
arriving at different steps, preempted and recomputed in a pool too small for all of them, each give the output they
give alone; a request's metrics report the KV memory it held; specs are parsed and refused precisely."""
from __future__ import annotations

import pytest
import torch

from leaplm import SamplingParams
from leaplm.cache.policies import SnapKV, StreamingLLM, parse_kv_policy
from leaplm.engine import LLMEngine
from leaplm.engine.kv_pool import KVPool
from leaplm.errors import InvalidParamsError
from leaplm.llm import request_metrics
from leaplm.models.load import build_model
from leaplm.quant import quantize_model

from .helpers import generate

POLICIES = [None, "snapkv:ratio=0.3,window=8", "streaming_llm:sinks=4,window=20,evict=8", "snapkv:budget=24,window=4"]


def test_mixed_policies_preempted_equal_alone(tiny_model_dir):
    model = quantize_model(build_model(tiny_model_dir("llama-gqa-untied")[0]), "int8")
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 128, (int(n),), generator=gen).tolist() for n in (50, 70, 90, 60, 45, 80)]
    policies = [POLICIES[i % len(POLICIES)] for i in range(len(prompts))]
    alone = [generate(model, p, pol, max_tokens=40)[0] for p, pol in zip(prompts, policies)]
    # room for ~2 requests at once: later ones wait, running ones get preempted and recomputed
    engine = LLMEngine(model, eos_token_ids=[], block_size=4, prefill_chunk=16,
                       kv_cache_memory=240 * KVPool.bytes_per_token(model.config))
    rids = []
    for step in range(10_000):
        if step % 3 == 0 and len(rids) < len(prompts):
            i = len(rids)
            rids.append(engine.add_request(prompts[i], SamplingParams(
                temperature=0, max_tokens=40, ignore_eos=True, kv_policy=policies[i] or "none")))
        if not engine.has_unfinished() and len(rids) == len(prompts):
            break
        engine.step()
    assert engine.scheduler.preemptions > 0
    assert [engine.get_request(r).output_ids for r in rids] == alone
    assert engine.blocks.used_blocks == 0 or engine.blocks.free_blocks == engine.blocks.num_blocks


def test_metrics_report_kv_bytes(tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = torch.randint(3, 128, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    block = 4 * KVPool.bytes_per_token(model.config)
    _, full = generate(model, prompt, None, max_tokens=30)
    _, snap = generate(model, prompt, "snapkv:ratio=0.25,window=8", max_tokens=30)
    m_full, m_snap = request_metrics(full), request_metrics(snap)
    assert m_full["kv_cache_bytes"] == m_full["kv_final_bytes"] == 38 * block   # 150 slots
    assert m_snap["kv_final_bytes"] == 15 * block                               # 30 kept + 30 generated
    assert m_snap["kv_cache_bytes"] == (30 + 8) * block                          # the prompt + its compressed copy
    assert m_snap["kv_policy"] == "snapkv:ratio=0.25,window=8,kernel=15" and m_full["kv_policy"] is None


def test_specs():
    assert parse_kv_policy(None) is None and parse_kv_policy("none") is None and parse_kv_policy("full") is None
    p = parse_kv_policy("StreamingLLM".lower().replace("streamingllm", "streaming-llm") + ":sinks=8,window=100")
    assert isinstance(p, StreamingLLM) and (p.sinks, p.window, p.evict) == (8, 100, 64)
    assert isinstance(parse_kv_policy({"method": "snapkv", "budget": 64}), SnapKV)
    for bad, words in [("h3o", "unknown kv_policy 'h3o'"), ("snapkv:ratio", "key=value"), (3, "must be a string")]:
        with pytest.raises(InvalidParamsError, match=words):
            parse_kv_policy(bad)
    with pytest.raises(InvalidParamsError, match="kv_policy"):
        SamplingParams(kv_policy="snapkv:budget=-3")


def test_capacity_check_counts_the_policy(tiny_model_dir):
    """A bounded policy needs only its window of the pool; without one the same request is refused."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    engine = LLMEngine(model, eos_token_ids=[], block_size=4, kv_cache_memory=64 * KVPool.bytes_per_token(model.config))
    with pytest.raises(InvalidParamsError, match="KV pool holds 64"):
        engine.add_request([5] * 10, SamplingParams(max_tokens=100))
    engine.add_request([5] * 10, SamplingParams(max_tokens=100, kv_policy="streaming_llm:window=36,evict=8"))


def test_llm_streams_past_the_context(tmp_path_factory):
    """Through ``LLM``: a prompt longer than the 512-token context and 600 tokens out under StreamingLLM; refused
    without it; the metrics report the bounded KV."""
    from leaplm import LLM
    from leaplm.errors import PromptTooLongError
    from tests.structured_helpers import build_tiny_llm, tiny_tokenizer

    llm = LLM(build_tiny_llm(tmp_path_factory.mktemp("stream-llm"), tiny_tokenizer()), quantization=None,
              kv_policy="streaming_llm:window=100,evict=16")
    prompt = torch.randint(3, 100, (700,), generator=torch.Generator().manual_seed(2)).tolist()
    out = llm.generate(prompt, SamplingParams(max_tokens=600, ignore_eos=True, temperature=0))[0]
    assert len(out.token_ids) == 600
    assert out.metrics["kv_policy"] == "streaming_llm:sinks=4,window=100,evict=16"
    assert out.metrics["kv_cache_bytes"] <= (120 // 16 + 1) * 16 * KVPool.bytes_per_token(llm.config)
    with pytest.raises(PromptTooLongError):
        llm.generate(prompt, SamplingParams(max_tokens=5, kv_policy="none"))


def test_prefix_match_stops_at_the_prompt(tiny_model_dir):
    """A prompt-compressing policy never starts past its prompt from the prefix cache (its compression point), even
    when the cache holds blocks of the prompt and the tokens after it (a plain request with the same text)."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(8)).tolist()
    engine = LLMEngine(model, eos_token_ids=[], block_size=4)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    text = prompt + engine.get_request(rid).output_ids
    for spec, limit in (("knorm:budget=12,window=0", 39), ("snapkv:budget=12,window=8", 32)):
        r = engine.requests[engine.add_request(text[:60], SamplingParams(max_tokens=5, kv_policy=spec))]
        r.prompt_ids = prompt                    # as after a preemption: the output pends with the prompt
        engine.scheduler._match_prefix(r)
        assert 0 < r.num_computed <= limit
        engine.scheduler._release(r)
        engine.abort(r.request_id)


def test_compaction_in_place_when_the_pool_is_full(tiny_model_dir):
    """No room for the compressed copy (another request holds the rest of the pool): the kept keys/values are written
    into the request's own first blocks; the output is the same as with room."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    gen = torch.Generator().manual_seed(9)
    prompt, other = (torch.randint(3, 128, (n,), generator=gen).tolist() for n in (64, 30))
    roomy, _ = generate(model, prompt, "snapkv:budget=16,window=4", max_tokens=20)
    engine = LLMEngine(model, eos_token_ids=[], block_size=4, prefix_caching=False,
                       kv_cache_memory=100 * KVPool.bytes_per_token(model.config))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request(other, params)
    rid = engine.add_request(prompt, SamplingParams(**{**params.__dict__, "kv_policy": "snapkv:budget=16,window=4"}))
    while engine.has_unfinished():
        engine.step()
    r = engine.get_request(rid)
    assert r.output_ids == roomy and r.kv_state["kept"] == 16 and not r.kv_state.get("skipped")
    assert r.peak_kv_blocks == 16   # the prompt's blocks, never a copy beside them
    assert engine.scheduler.preemptions == 0
