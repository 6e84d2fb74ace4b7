"""Knorm against an oracle: transformers' prompt cache pruned per head to the smallest-norm keys (+ the window),
then transformers' greedy decoding; leaplm's engine must give the same tokens, query-agnostic (no window queries,
so the prefix cache may cover the whole prompt)."""
from __future__ import annotations

import pytest
import torch

from leaplm.cache.policies import Knorm, parse_kv_policy
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model

from .helpers import generate, hf_decode


def hf_knorm(hf, prompt: list[int], keep: int, window: int, n: int) -> list[int]:
    P = len(prompt)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        for entry in cache.layers:
            norms = entry.keys[0, :, : P - window].norm(dim=-1)               # [KV, P - w]
            top = (-norms).topk(keep - window, dim=-1).indices
            idx = torch.cat((top, torch.arange(P - window, P).expand(top.shape[0], -1)), -1).sort(-1).values
            gather = idx[None, :, :, None].expand(1, -1, -1, entry.keys.shape[-1])
            entry.keys, entry.values = entry.keys.gather(2, gather), entry.values.gather(2, gather)
    tokens = hf_decode(hf, out, cache, P, keep, n)
    return tokens


@pytest.mark.parametrize("window", [0, 6])
def test_knorm_matches_transformers_oracle(window, tiny_model_dir):
    folder, hf = tiny_model_dir("qwen2-bias")
    model = build_model(folder)
    prompt = torch.randint(3, 128, (80,), generator=torch.Generator().manual_seed(4)).tolist()
    want = hf_knorm(hf, prompt, keep=24, window=window, n=20)
    got, r = generate(model, prompt, f"knorm:budget=24,window={window}", max_tokens=20, prefill_chunk=9)
    assert got == want and r.kv_state["kept"] == 24


def test_knorm_spec():
    p = parse_kv_policy("knorm")
    assert isinstance(p, Knorm) and p.ratio == 0.25 and p.capture == 0 and p.spec() == "knorm:ratio=0.25,window=32"
    with pytest.raises(InvalidParamsError, match="kernel"):
        parse_kv_policy("knorm:kernel=5")
