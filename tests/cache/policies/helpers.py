"""Shared by the KV policy tests: run one request through an engine, greedy."""
from __future__ import annotations

from leaplm import SamplingParams
from leaplm.engine import LLMEngine


def generate(model, prompt, policy=None, max_tokens=40, speculative=None, block_size=4, **kw):
    """Greedy output ids of one request and the finished ``Request`` (``kv_shift`` and state as it ended)."""
    engine = LLMEngine(model, eos_token_ids=[], block_size=block_size, kv_policy=policy, **kw)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                             speculative=speculative)
    while engine.has_unfinished():
        engine.step()
    r = engine.get_request(rid)
    return r.output_ids, r


def hf_decode(hf, out, cache, prompt_len: int, held: int, n: int) -> list[int]:
    """transformers' greedy tokens after a prefill ``out`` whose ``cache`` was pruned to ``held`` tokens: each new
    token at its text position, written after the held ones."""
    import torch

    tokens = [int(out.logits[0, -1].argmax())]
    with torch.no_grad():
        for t in range(n - 1):
            out = hf(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True,
                     position_ids=torch.tensor([[prompt_len + t]]), cache_position=torch.tensor([held + t]))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
