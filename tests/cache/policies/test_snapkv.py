"""SnapKV against an independent oracle: transformers' own attention weights (eager attention, the prompt's last
``window`` rows) choose the tokens, transformers' cache is pruned to them per head, and transformers decodes
greedily from it. leaplm's engine (its queries captured during a chunked prefill, its compacted paged cache) must
give the same tokens; with speculation, the same tokens again; and it really holds fewer blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.speculative.drafters import PromptLookup

from ...engine_helpers import Oracle
from .helpers import generate, hf_decode


def hf_snapkv(hf, prompt: list[int], keep: int, window: int, kernel: int, n: int) -> list[int]:
    """Greedy decoding of ``hf`` after SnapKV-compressing its prompt cache to ``keep`` tokens per KV head."""
    hf.set_attn_implementation("eager")
    cfg = hf.config
    kv_heads, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    P = len(prompt)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True, output_attentions=True)
        cache = out.past_key_values
        for layer, attn in enumerate(out.attentions):   # [1, H, P, P], softmaxed over the causal rows
            scores = attn[0, :, P - window:, : P - window].sum(1).view(kv_heads, group, -1).mean(1)
            scores = F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
            top = scores.topk(keep - window, dim=-1).indices
            idx = torch.cat((top, torch.arange(P - window, P).expand(kv_heads, -1)), -1).sort(-1).values
            entry = cache.layers[layer]
            gather = idx[None, :, :, None].expand(1, -1, -1, entry.keys.shape[-1])
            entry.keys, entry.values = entry.keys.gather(2, gather), entry.values.gather(2, gather)
    tokens = hf_decode(hf, out, cache, P, keep, n)
    hf.set_attn_implementation("sdpa")
    return tokens


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family,kernel", [("llama-gqa-untied", 5), ("llama-gqa-untied", 15), ("qwen2-bias", 15),
                                           ("qwen3-qknorm", 1)])
def test_snapkv_matches_transformers_oracle(family, kernel, tiny_model_dir):
    folder, hf = tiny_model_dir(family)
    model = build_model(folder)
    prompt = _prompt(90, 1)
    want = hf_snapkv(hf, prompt, keep=30, window=8, kernel=kernel, n=24)
    # a prefill chunk of 13 splits the observation window over two passes
    got, r = generate(model, prompt, f"snapkv:budget=30,window=8,kernel={kernel}", max_tokens=24, prefill_chunk=13)
    assert got == want
    assert r.kv_state["kept"] == 30
    # the engine held the prompt (23 blocks of 4) plus the compressed copy (8) at most, and 30 + 24 slots at the end
    assert r.peak_kv_blocks == 23 + 8
    assert r.final_kv_blocks == -(-(30 + 24) // 4)


def test_snapkv_is_exact_when_the_prompt_fits_the_budget(tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(40, 2)
    plain, _ = generate(model, prompt, None)
    kept, r = generate(model, prompt, "snapkv:budget=64")
    assert kept == plain and "kept" not in r.kv_state


@pytest.mark.parametrize("tree", [False, True])
def test_snapkv_speculation_is_token_identical(tree, tiny_model_dir):
    """Verification passes read the compressed cache that plain decoding reads: every rollback length and a tree
    whose accepted path must be compacted give the policy's plain output."""
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(70, 3)
    plain, _ = generate(model, prompt, "snapkv:ratio=0.3,window=8", max_tokens=40)
    oracle = Oracle([prompt + plain], num_draft=5, tree=tree)
    spec, r = generate(model, prompt, "snapkv:ratio=0.3,window=8", max_tokens=40, speculative=oracle, goodput=False)
    assert spec == plain
    assert r.accepted > 0
    lookup, _ = generate(model, prompt, "snapkv:ratio=0.3,window=8", max_tokens=40, speculative=PromptLookup())
    assert lookup == plain


def test_snapkv_leaves_the_prompt_in_the_prefix_cache(tiny_model_dir):
    """The prompt's blocks are released, not overwritten: a second request with the same prompt (another policy)
    starts from them and gets the output it gets alone."""
    from leaplm import SamplingParams
    from leaplm.engine import LLMEngine

    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    prompt = _prompt(64, 4)
    engine = LLMEngine(model, eos_token_ids=[], block_size=4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = []
    for policy in ("snapkv:ratio=0.25,window=8", None):
        rid = engine.add_request(prompt, SamplingParams(**{**params.__dict__, "kv_policy": policy or "none"}))
        while engine.has_unfinished():
            engine.step()
        outs.append(engine.get_request(rid))
    # the compressed request's own decode blocks reuse the least recently used cached ones (the prompt's tail)
    assert outs[1].cached_tokens >= 40
    assert outs[1].output_ids == generate(model, prompt, None, max_tokens=20)[0]
    assert outs[0].output_ids == generate(model, prompt, "snapkv:ratio=0.25,window=8", max_tokens=20)[0]


def test_snapkv_knobs_are_checked():
    from leaplm.cache.policies import parse_kv_policy

    for bad, words in [("snapkv:ratio=0", "ratio"), ("snapkv:ratio=0.5,budget=10", "not both"),
                       ("snapkv:kernel=4", "odd"), ("snapkv:window=0", "window"), ("snapkv:windw=3", "windw")]:
        with pytest.raises(InvalidParamsError, match=words):
            parse_kv_policy(bad)
    assert parse_kv_policy("snapkv").kept(1000) == 250
    assert parse_kv_policy("snapkv:budget=100").kept(50) == 50
    assert parse_kv_policy("snapkv:budget=10,window=32").kept(1000) == 32
