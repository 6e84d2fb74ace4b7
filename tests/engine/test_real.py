"""The continuous-batching engine on the real SmolLM2 (int8, the GGUF default): chat requests sharing a system
prompt arrive at random steps into a small KV pool (preemption), one is aborted, half speculate with prompt lookup;
every finished request's greedy output equals the same request run alone."""
from __future__ import annotations

import random

import pytest

from leaplm.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain recursion to a child.",
             "List three prime numbers.", "What is 17 times 3?", "Name a famous painter and one painting.",
             "Why is the sky blue?", "Translate 'good morning' to Spanish and French."]
SYSTEM = "You are a helpful assistant. Answer briefly, precisely and politely, in plain English."


@pytest.mark.real
def test_random_arrivals_preemption_and_prefix_hits_on_smollm2(smollm_gguf):
    from leaplm import LLM
    from leaplm.engine.kv_pool import KVPool

    llm = LLM(str(smollm_gguf), max_num_seqs=4)
    prompts = [llm.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=24)
    alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]

    # a second engine on the same model: a pool of 160 tokens (each request needs up to ~85) forces preemption
    from leaplm.engine import LLMEngine

    engine = LLMEngine(llm.model, llm.tokenizer.eos_token_ids, max_num_seqs=4, prefill_chunk=32,
                       kv_cache_memory=160 * KVPool.bytes_per_token(llm.config), drafter_factory=llm.drafter_for)
    rng = random.Random(7)
    arrive = {i: rng.randrange(0, 12) for i in range(len(prompts))}
    rids: dict[int, int] = {}
    step = 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        for i in range(len(prompts)):
            if i not in rids and arrive[i] <= step:
                rids[i] = engine.add_request(prompts[i], params, speculative="prompt_lookup" if i % 2 else None)
        if step == 6 and 5 in rids:
            engine.abort(rids[5])
        engine.step()
        step += 1
    for i, rid in rids.items():
        r = engine.get_request(rid)
        if r.finish_reason == "abort":
            assert i == 5
            continue
        assert r.output_ids == alone[i], i
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    assert stats["kv_blocks_used"] == 0
