"""leaplm's transformer equals transformers' on tiny random models of every supported family."""
from __future__ import annotations

import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from tests.conftest import tiny_configs

FAMILIES = list(tiny_configs())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = KVCache.for_model(model.config, ids.shape[0], ids.shape[1], torch.float32, "cpu")
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    return model(ids, positions, cache)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, tiny_model_dir):
    folder, ref = tiny_model_dir(name)
    model = build_model(folder)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = _logits(model, ids)
    with torch.no_grad():
        theirs = ref(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_continuation_matches_transformers(name, tiny_model_dir):
    folder, ref = tiny_model_dir(name)
    model = build_model(folder)
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, prompt.shape[1]:].tolist()
    engine = Engine(model, eos_token_ids=())
    batch = engine.start([prompt[0].tolist()], [SamplingParams(temperature=0, max_tokens=24)])
    while not batch.done:
        batch.step()
    assert batch.rows[0].output_ids == expected


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3", "qwen2-bias"])
def test_incremental_decode_matches_full_forward(name, tiny_model_dir):
    """Feeding tokens one by one through the cache gives the logits of one full forward."""
    folder, _ = tiny_model_dir(name)
    model = build_model(folder)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    full = _logits(model, ids)
    cache = KVCache.for_model(model.config, 1, 20, torch.float32, "cpu")
    model(ids[:, :5], torch.arange(5)[None], cache)
    steps = [model(ids[:, t: t + 1], torch.tensor([[t]]), cache, contiguous_start=t) for t in range(5, 20)]
    assert (torch.cat(steps, 1) - full[:, 5:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3", "mistral-sliding"])
def test_ragged_batch_equals_each_prompt_alone(name, tiny_model_dir):
    folder, _ = tiny_model_dir(name)
    model = build_model(folder)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    engine = Engine(model, eos_token_ids=())
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (20, 9, 14)]

    def run(ps, pars):
        batch = engine.start(ps, pars)
        while not batch.done:
            batch.step()
        return [r.output_ids for r in batch.rows]

    together = run(prompts, params)
    alone = [run([p], [q])[0] for p, q in zip(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == [20, 9, 14]


def test_chunked_prefill_equals_single_chunk(tiny_model_dir):
    folder, _ = tiny_model_dir("gemma3")
    model = build_model(folder)
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 7)]
    params = [SamplingParams(temperature=0, max_tokens=8)] * 2
    outs = []
    for chunk in (1024, 8):
        batch = Engine(model, prefill_chunk=chunk).start(prompts, params)
        while not batch.done:
            batch.step()
        outs.append([r.output_ids for r in batch.rows])
    assert outs[0] == outs[1]
