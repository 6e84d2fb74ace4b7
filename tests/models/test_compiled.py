"""The compiled decode step (models/compiled.py): close to eager on every family, one graph for every
batch and width, and speculation on a compiled int8 model equal to its own greedy decoding bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import leaplm.native
from leaplm.cache.kv import KVCache
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.quant import quantize_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import PromptLookup, TokenRecycling
from leaplm.speculative.tree import ancestor_matrix

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(folder, int8: bool | str):
    model = build_model(folder)
    return quantize_model(model, "int8" if int8 is True else int8) if int8 else model


def _passes(model, seed: int = 1):
    """Prefill 2 ragged rows, then a 1-token pass, a 3-token chain pass and a tree pass; their logits."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache.for_model(model.config, 2, 64, model.dtype, model.device)
    prompt = torch.randint(3, 100, (2, 10), generator=gen)
    model(prompt, torch.arange(10)[None].expand(2, -1), cache, kv_len=10, contiguous_start=0,
          logit_index=torch.tensor([[9], [9]]))
    for row in range(2):
        cache.commit(row, 10)
    out = []
    for width in (1, 3):
        tokens = torch.randint(3, 100, (2, width), generator=gen)
        out.append(model(tokens, 10 + torch.arange(width)[None].expand(2, -1), cache, kv_len=10 + width,
                         contiguous_start=10))
    # a tree: root, two children, a grandchild under the second child (positions follow depth)
    parents = [-1, -1, 1]
    mask = torch.stack([ancestor_matrix(parents, 4)] * 2)
    positions = torch.tensor([[10, 11, 11, 12]] * 2)
    out.append(model(torch.randint(3, 100, (2, 4), generator=gen), positions, cache, kv_len=14,
                     tree=([10, 10], mask)))
    return out


# native=None: the C++ ops of leaplm.native where they build (CPU float32); False: the Python custom ops
@pytest.mark.parametrize("name,int8,native", [
    ("llama-gqa-untied", True, None), ("gemma3", True, None), ("qwen3-qknorm", True, None),
    ("qwen2-bias", False, None), ("mistral-sliding", False, None),
    ("gemma3", True, False), ("mistral-sliding", False, False)])
def test_compiled_passes_match_eager(name, int8, native, tiny_model_dir):
    """Chain and tree passes, sliding windows, qk-norm, biases, tied heads: within float rounding of eager."""
    folder = tiny_model_dir(name)[0]
    eager, compiled = _model(folder, int8), _model(folder, int8)
    assert compiled.compile(native=native) > 0
    assert compiled.compiled.native == (native is None and leaplm.native.available())
    graphs = counters["stats"]["unique_graphs"]
    for a, b in zip(_passes(eager), _passes(compiled)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs   # widths 1, 3, 4, trees: the warm-up's graph
    assert compiled.compile() == 0.0                      # compiling twice is a no-op


@pytest.mark.parametrize("native", [None, False])
def test_speculation_on_a_compiled_int8_model_equals_its_greedy_decoding(native, tiny_model_dir):
    folder = tiny_model_dir("llama-gqa-untied")[0]
    model = _model(folder, int8=True)
    model.compile(native=native)
    engine = Engine(model, eos_token_ids=[2])
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, 128, (6,), generator=gen).tolist()
    prompts = [base * 4, torch.randint(3, 128, (9,), generator=gen).tolist() + base * 2, base[:3] * 5]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 17, 25)]
    vanilla = engine.start(prompts, params).run()
    for drafter in (PromptLookup(5), TokenRecycling(num_draft=8, node_cost=0.0)):   # chains and trees
        spec = engine.start(prompts, params, drafter).run()
        assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla], drafter.name
        assert sum(r.accepted for r in spec) > 0
    # batch 1 too: a row alone decodes as it does in the batch
    alone = engine.start(prompts[1:2], params[1:2]).run()
    assert alone[0].output_ids == vanilla[1].output_ids


def test_compiled_rows_are_bit_identical_whatever_the_pass_width(tiny_model_dir):
    """Feeding 3 tokens at once gives each row exactly the logits of feeding them one by one."""
    model = _model(tiny_model_dir("llama-gqa-untied")[0], int8=True)
    model.compile()
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 100, (1, 8), generator=gen)
    step = torch.randint(3, 100, (1, 3), generator=gen)
    logits = []
    for widths in ((3,), (1, 1, 1)):
        cache = KVCache.for_model(model.config, 1, 32, model.dtype, model.device)
        model(prompt, torch.arange(8)[None], cache, kv_len=8, contiguous_start=0, logit_index=torch.tensor([[7]]))
        cache.commit(0, 8)
        start, parts = 8, []
        for w in widths:
            parts.append(model(step[:, start - 8: start - 8 + w], torch.arange(start, start + w)[None], cache,
                               kv_len=start + w, contiguous_start=start))
            start += w
        logits.append(torch.cat(parts, dim=1))
    assert torch.equal(logits[0], logits[1])


def test_compiled_int4_matches_eager_and_speculation_stays_exact(tiny_model_dir):
    folder = tiny_model_dir("qwen3-qknorm")[0]
    eager, compiled = _model(folder, "int4"), _model(folder, "int4")
    compiled.compile()
    for a, b in zip(_passes(eager), _passes(compiled)):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    engine = Engine(compiled, eos_token_ids=[2])
    gen = torch.Generator().manual_seed(7)
    base = torch.randint(3, 128, (5,), generator=gen).tolist()
    prompts, params = [base * 5, base[:2] * 6], [SamplingParams(temperature=0, max_tokens=n) for n in (28, 20)]
    vanilla = engine.start(prompts, params).run()
    for drafter in (PromptLookup(5), TokenRecycling(num_draft=8, node_cost=0.0)):
        spec = engine.start(prompts, params, drafter).run()
        assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla], drafter.name


def test_two_compiled_models_in_one_process_each_run_their_own_graph(tiny_model_dir):
    """Guards are skipped after compiling (compiled.py); the graphs of two models must still not mix."""
    a = _model(tiny_model_dir("llama-gqa-untied")[0], int8=True)
    b = _model(tiny_model_dir("qwen2-bias")[0], int8=True)   # other weights and sizes, same code object
    expected = [_passes(a, seed=4), _passes(b, seed=4)]
    a.compile()
    b.compile()
    for _ in range(2):   # interleaved
        for model, want in zip((a, b), expected):
            for got, ref in zip(_passes(model, seed=4), want):
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_compiled_passes_call_the_graph_directly_with_the_guarded_calls_bits(tiny_model_dir):
    """After compiling, a pass calls the code dynamo generated for the step as a plain function (no frame
    hook, no cache lookup); its logits are the guarded dynamo call's bit for bit, chains and trees."""
    from torch._C._dynamo import eval_frame

    model = _model(tiny_model_dir("llama-gqa-untied")[0], int8=True)
    model.compile()
    step = model.compiled
    if hasattr(eval_frame, "_debug_get_cache_entry_list"):   # torch's accessor: present in the pinned torch
        assert step.direct is not None
    direct = _passes(model, seed=6)
    step.direct = None   # back to the guarded call through dynamo
    guarded = _passes(model, seed=6)
    for a, b in zip(direct, guarded):
        assert torch.equal(a, b)


def test_prefill_stays_eager(tiny_model_dir):
    model = _model(tiny_model_dir("llama-gqa-untied")[0], int8=False)
    model.compile(warm_up=False)
    cache = KVCache.for_model(model.config, 1, 16, model.dtype, model.device)
    model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache, kv_len=3, contiguous_start=0)
    assert model.compiled.compile_s is None          # a fresh prefill did not touch the compiled step


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_real_smollm_compiled_speculation_is_exact(quantization, smollm_gguf):
    from leaplm import LLM
    from leaplm.sampling import SamplingParams as P

    llm = LLM(smollm_gguf, quantization=quantization, compile=True)
    assert llm.compile_s and llm.compile_s > 0
    prompts = ["Summarize: The cat sat on the mat. The cat sat on the mat because the mat was warm.",
               "def fibonacci(n):"]
    params = P(temperature=0, max_tokens=48)
    vanilla = [o.token_ids for o in llm.generate(prompts, params)]
    for method in ("prompt_lookup", {"method": "recycling", "lookup": True}):
        assert [o.token_ids for o in llm.generate(prompts, params, speculative=method)] == vanilla
