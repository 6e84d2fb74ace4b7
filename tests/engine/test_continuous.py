"""Continuous batching is exact: every request's greedy output equals what it produces alone, whatever runs
beside it - requests arriving at random steps, aborts, preemption and recompute, prefix-cache hits, chunked
prefill, drafts (chains and trees, per request) - and the KV pool is empty afterwards.

Tiny random models of several families (float32 and int8), built with transformers (``conftest.py``)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from leaplm import SamplingParams
from leaplm.engine import LLMEngine
from leaplm.engine.kv_pool import KVPool
from leaplm.models.load import build_model
from leaplm.quant import quantize_model
from leaplm.speculative.drafters import PromptLookup

from ..engine_helpers import Oracle

FAMILIES = ["llama-gqa-untied-int8", "mistral-sliding-int8", "gemma3-int8", "qwen2-bias", "llama-mha-tied"]


def _model(name: str, tiny_model_dir):
    base = name.removesuffix("-int8")
    model = build_model(tiny_model_dir(base)[0])
    return quantize_model(model, "int8") if name != base else model


def _engine(model, tokens_of_kv: int | None = None, **kw) -> LLMEngine:
    memory = None if tokens_of_kv is None else tokens_of_kv * KVPool.bytes_per_token(model.config)
    kw.setdefault("block_size", 4)
    return LLMEngine(model, eos_token_ids=[2], kv_cache_memory=memory, **kw)


def _prompts(n: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``n`` random prompts of 3..40 tokens; the first ``shared`` tokens common to all (a system prompt)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 128, (shared,), generator=gen).tolist()
    return [head + torch.randint(3, 128, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def _alone(model, prompt, params, drafter=None) -> list[int]:
    engine = _engine(model)
    rid = engine.add_request(prompt, params, speculative=drafter)
    while engine.has_unfinished():
        engine.step()
    return engine.get_request(rid).output_ids


def _mixed(engine: LLMEngine, prompts, params, seed: int, drafters=None, abort: set[int] = frozenset()):
    """Add the prompts at random steps (a few at a time), abort the ``abort`` ones a few steps after they arrive;
    returns request ids in prompt order."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rids: dict[int, int] = {}
    arrive_at = {i: rng.randrange(0, 3 * len(prompts)) for i in order}
    abort_at = {i: arrive_at[i] + rng.randrange(1, 6) for i in abort}
    step = 0
    while len(rids) < len(prompts) or engine.has_unfinished():
        for i in order:
            if i not in rids and arrive_at[i] <= step:
                d = drafters[i] if drafters else None
                rids[i] = engine.add_request(prompts[i], params[i], speculative=d)
            if i in abort_at and abort_at[i] == step and i in rids:
                engine.abort(rids[i])
        engine.step()
        step += 1
        assert step < 5000
    return [rids[i] for i in range(len(prompts))]


@pytest.mark.parametrize("name", FAMILIES)
def test_random_arrivals_aborts_and_preemption_leave_every_output_as_alone(name, tiny_model_dir):
    model = _model(name, tiny_model_dir)
    prompts = _prompts(9, seed=1, shared=9)
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(9)]
    expected = [_alone(model, p, s) for p, s in zip(prompts, params)]
    # 120 KV slots for 9 requests of up to 75 tokens: preemption is certain; 4 run at most; chunks of 8 tokens
    engine = _engine(model, tokens_of_kv=120, max_num_seqs=4, prefill_chunk=8, max_num_batched_tokens=12)
    rids = _mixed(engine, prompts, params, seed=2, abort={3})
    for i, rid in enumerate(rids):
        r = engine.get_request(rid)
        if i == 3:
            assert r.finish_reason == "abort"
            continue
        assert r.output_ids == expected[i], (i, r.preemptions)
    stats = engine.stats()
    assert stats["preemptions"] > 0, stats
    assert stats["prefix_cache_hits"] > 0, stats     # the shared 9-token head: two full blocks of 4
    assert stats["kv_blocks_used"] == 0 and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("name", ["llama-gqa-untied-int8", "gemma3-int8"])
def test_per_request_drafts_in_a_mixed_batch_give_the_output_alone(name, tree, tiny_model_dir):
    """Some requests speculate (each with its own oracle drafter, partly wrong, so every rollback length and tree
    compaction happens), some use prompt lookup, some decode plainly - all in the same passes."""
    model = _model(name, tiny_model_dir)
    prompts = _prompts(6, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=14 + 2 * i, ignore_eos=True) for i in range(6)]
    expected = [_alone(model, p, s) for p, s in zip(prompts, params)]
    drafters = [Oracle([p + e], num_draft=5, tree=tree) if i % 3 == 0 else PromptLookup(num_draft=4, min_ngram=1)
                if i % 3 == 1 else None for i, (p, e) in enumerate(zip(prompts, expected))]
    engine = _engine(model, tokens_of_kv=160, max_num_seqs=4, prefill_chunk=16)
    rids = _mixed(engine, prompts, params, seed=6, drafters=drafters)
    for i, rid in enumerate(rids):
        assert engine.get_request(rid).output_ids == expected[i], i
    oracle_accepts = sum(engine.get_request(rids[i]).accepted for i in range(0, 6, 3))
    assert oracle_accepts > 0
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_hits_skip_the_shared_prefix_and_change_nothing(tiny_model_dir):
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    prompts = _prompts(4, seed=9, shared=30)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [_alone(model, p, params) for p in prompts]
    engine = _engine(model)
    outs = []
    for p in prompts:   # one after another: each later one finds the first one's blocks
        rid = engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
        outs.append(engine.get_request(rid))
    assert [r.output_ids for r in outs] == expected
    assert outs[0].cached_tokens == 0 and all(r.cached_tokens == 28 for r in outs[1:])   # 7 blocks of 4
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 21 and stats["prefix_cache_hit_rate"] == 21 / stats["prefix_cache_queries"]


def test_a_chat_turn_reuses_the_previous_answer_but_never_its_uncomputed_last_token(tiny_model_dir):
    """Multi-turn chat: the next prompt is the previous prompt + answer + a new message, so it hits the blocks
    the first request filled - except the one holding the answer's last token, which was sampled but never fed
    (its keys do not exist). The second turn equals its output alone."""
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)   # prompt 15 + 13: the last token ends block 7
    first = _prompts(1, seed=12, shared=15)[0][:15]
    engine = _engine(model)
    rid = engine.add_request(first, params)
    while engine.has_unfinished():
        engine.step()
    answer = engine.get_request(rid).output_ids
    assert (len(first) + len(answer)) % 4 == 0   # the answer's last token closes a block
    second = first + answer + [7, 8, 9]
    expected = _alone(model, second, params)
    rid2 = engine.add_request(second, params)
    while engine.has_unfinished():
        engine.step()
    r = engine.get_request(rid2)
    assert r.output_ids == expected
    assert r.cached_tokens == len(first) + len(answer) - 4   # every full block but the one with the unfed token


def test_a_block_is_cached_only_once_every_slot_is_committed(tiny_model_dir):
    """A request whose committed length ends one short of a block boundary (its pending token goes in that
    block's last slot) is aborted: that block must not be in the prefix cache, or a later prompt starting with
    the same tokens would read a slot that was never written."""
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = _prompts(1, seed=21, shared=15)[0][:15]   # 15 tokens: after the prefill, slot 15 (block 3's last) pends
    engine = _engine(model)
    rid = engine.add_request(first, params)
    engine.step()
    pending = engine.get_request(rid).output_ids
    assert engine.get_request(rid).num_computed == 15 and len(pending) == 1
    engine.abort(rid)
    second = first + pending + [7, 8, 9, 10]
    expected = _alone(model, second, params)
    rid2 = engine.add_request(second, params)
    while engine.has_unfinished():
        engine.step()
    r = engine.get_request(rid2)
    assert r.cached_tokens == 12 and r.output_ids == expected


def test_n_samples_of_one_prompt_share_its_blocks(tiny_model_dir):
    """The same prompt sampled several times (different seeds): later copies admitted after the first one's
    prefill reuse its blocks; each sample equals that seed's sample alone."""
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    prompt = _prompts(1, seed=3, shared=20)[0]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)]
    expected = [_alone(model, prompt, p) for p in params]
    assert len({tuple(e) for e in expected}) > 1   # the seeds differ: a real test
    engine = _engine(model, max_num_seqs=4)
    first = engine.add_request(prompt, params[0])
    engine.step()   # the first copy's prefill registers the prompt's full blocks
    rids = [first] + [engine.add_request(prompt, p) for p in params[1:]]
    while engine.has_unfinished():
        engine.step()
    assert [engine.get_request(r).output_ids for r in rids] == expected
    assert all(engine.get_request(r).cached_tokens > 0 for r in rids[1:])


def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_advance(tiny_model_dir):
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    engine = _engine(model, max_num_seqs=4, prefill_chunk=16, max_num_batched_tokens=20)
    short = engine.add_request(_prompts(1, seed=2)[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    engine.step()
    long_prompt = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    long = engine.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    gained = []
    while not engine.get_request(long).output_ids:
        before = len(engine.get_request(short).output_ids)
        engine.step()
        gained.append(len(engine.get_request(short).output_ids) - before)
    assert len(gained) >= 150 // 16          # chunked: at most 16 prompt tokens a step
    assert all(g == 1 for g in gained)       # and the short request advanced in every one of those steps
    while engine.has_unfinished():
        engine.step()
    assert engine.get_request(long).output_ids == _alone(model, long_prompt, engine.get_request(long).params)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_a_thousand_requests_leave_the_pool_empty_and_memory_flat(tiny_model_dir):
    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    engine = _engine(model, tokens_of_kv=400, max_num_seqs=16, block_size=8)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    rss = {}
    finished: dict[int, tuple[str, int]] = {}   # request id -> (finish reason, output tokens)

    def step() -> None:
        for out in engine.step():
            if out.finish_reason is not None:
                finished[out.request_id] = (out.finish_reason, len(engine.get_request(out.request_id).output_ids))

    for i in range(1000):
        engine.add_request(torch.randint(3, 128, (int(torch.randint(2, 20, (1,), generator=gen)),),
                                         generator=gen).tolist(), params)
        if i % 7 == 3:
            engine.abort(i - 2)
        if i % 4 == 0:
            step()
        if i % 100 == 99:
            for rid in [rid for rid, r in engine.requests.items() if r.finish_emitted]:
                engine.release(rid)   # what LLM.generate and a server do with finished requests
            rss[i + 1] = _rss_mb()
    while engine.has_unfinished():
        step()
    # after warming up, 700 more requests through the same pool add no memory (a leak of a few KB per request
    # - a request, its tokens, a drafter row - would show as several MB)
    assert rss[1000] - rss[300] < 8, rss
    assert engine.stats()["kv_blocks_used"] == 0
    assert sum(engine.blocks.ref) == 0
    done = [n for reason, n in finished.values() if reason == "length"]
    assert len(done) > 800 and all(n == 3 for n in done)
    for rid in list(engine.requests):
        engine.release(rid)
    assert not engine.requests


def test_a_request_the_pool_can_never_hold_is_refused_up_front(tiny_model_dir):
    from leaplm.errors import InvalidParamsError

    model = _model("llama-gqa-untied-int8", tiny_model_dir)
    engine = _engine(model, tokens_of_kv=40)
    with pytest.raises(InvalidParamsError, match="KV pool holds 40"):
        engine.add_request(list(range(3, 33)), SamplingParams(max_tokens=20))
    assert not engine.has_unfinished()
