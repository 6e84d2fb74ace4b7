"""The engine through real generations on tiny random models: rollback and tree compaction of the KV
cache under partly wrong drafts, penalties along a tree's accepted path, and the context window's
last slot. Every check compares with vanilla decoding of the same model, token for token."""
from __future__ import annotations

import shutil

import pytest
import torch

from leaplm import LLM, SamplingParams
from leaplm.engine import Engine
from leaplm.errors import PromptTooLongError
from leaplm.models.load import build_model
from leaplm.models.paged import PagedStep
from leaplm.quant import quantize_model

from .engine_helpers import Oracle, save_char_tokenizer

# sliding windows (mistral: 8 everywhere; gemma3: 8 on alternate layers) are shorter than the contexts
FAMILIES = ["llama-gqa-untied", "mistral-sliding", "gemma3", "qwen2-bias-int8"]


def _engine(name: str, tiny_model_dir) -> Engine:
    """``name`` of a tiny family; ``-int8`` suffix: int8 weights (batch-invariant decode attention)."""
    base = name.removesuffix("-int8")
    model = build_model(tiny_model_dir(base)[0])
    if name != base:
        model = quantize_model(model, "int8")
    return Engine(model, eos_token_ids=[2])


def _prompts() -> list[list[int]]:
    """Two ragged random prompts (the rows write their KV slots at different lengths)."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (12, 5)]


def _generate(engine: Engine, prompts, params, drafter=None):
    batch = engine.start(prompts, params, drafter, keep_kv=True)
    batch.run()
    batch.cache = batch.kv_snapshot()
    return batch


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("name", FAMILIES)
def test_partly_wrong_drafts_roll_back_to_exactly_vanilla(name, tree, tiny_model_dir):
    """Drafts that are the greedy answer with one wrong token (accepting 0..k tokens, in turn) give
    vanilla's tokens, and leave in the committed KV slots the keys and values vanilla computed: a
    rollback or compaction off by one slot shifts or keeps a rejected token's keys."""
    engine = _engine(name, tiny_model_dir)
    prompts = _prompts()
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (26, 19)]
    vanilla = _generate(engine, prompts, params)
    oracle = Oracle([p + r.output_ids for p, r in zip(prompts, vanilla.rows)], tree=tree)
    spec = _generate(engine, prompts, params, oracle)
    assert [r.output_ids for r in spec.rows] == [r.output_ids for r in vanilla.rows]
    drafted, accepted = sum(r.drafted for r in spec.rows), sum(r.accepted for r in spec.rows)
    assert 0 < accepted < drafted, (accepted, drafted)
    for b in range(len(prompts)):
        n = min(spec.cache.lengths[b], vanilla.cache.lengths[b])
        assert n >= len(prompts[b]) + len(vanilla.rows[b].output_ids) - 1   # every fed token is committed
        for layer in range(engine.config.num_layers):
            for ours, ref in ((spec.cache.k, vanilla.cache.k), (spec.cache.v, vanilla.cache.v)):
                assert torch.allclose(ours[layer][b, :, :n], ref[layer][b, :, :n], atol=1e-4), (b, layer)


PENALTIES = {"presence": dict(presence_penalty=1.5), "frequency": dict(frequency_penalty=1.0),
             "repetition": dict(repetition_penalty=1.8)}


@pytest.mark.parametrize("penalty", PENALTIES.values(), ids=PENALTIES.keys())
def test_penalties_count_the_accepted_path_of_a_tree(penalty, tiny_model_dir):
    """With presence / frequency / repetition penalties, tree drafts (whose accepted path is not the
    front of the feed order) give vanilla's penalized greedy output; and sampling whose verification is
    deterministic (top_k=1 leaves only the penalized argmax) gives it too, through the sampled path."""
    engine = _engine("llama-gqa-untied", tiny_model_dir)
    prompts = [[5, 9, 14, 5, 9, 14, 30, 31] * 2, [40, 41, 40, 41, 42]]
    plain = _generate(engine, prompts, [SamplingParams(temperature=0, max_tokens=22, ignore_eos=True)] * 2)
    greedy = SamplingParams(temperature=0, max_tokens=22, ignore_eos=True, **penalty)
    vanilla = _generate(engine, prompts, [greedy] * 2)
    expected = [r.output_ids for r in vanilla.rows]
    for b in range(2):
        assert expected[b] != plain.rows[b].output_ids, f"the penalty does not change row {b}: no test"
    answers = [p + ids for p, ids in zip(prompts, expected)]
    sampled = SamplingParams(temperature=0.7, top_k=1, seed=3, max_tokens=22, ignore_eos=True, **penalty)
    assert [r.output_ids for r in _generate(engine, prompts, [sampled] * 2).rows] == expected
    for params in (greedy, sampled):
        for tree in (True, False):
            spec = _generate(engine, prompts, [params] * 2, Oracle(answers, tree=tree))
            assert [r.output_ids for r in spec.rows] == expected, (params, tree)
            assert sum(r.accepted for r in spec.rows) > 0


# ---------------------------------------------------------------------- the context window
N = 20   # max_model_len of the boundary tests


@pytest.fixture(scope="module")
def tiny_folder(tiny_model_dir, tmp_path_factory):
    """The tiny llama checkpoint (256 positions) with a character tokenizer, so ``LLM`` loads it."""
    folder = tmp_path_factory.mktemp("tiny-llm") / "model"
    shutil.copytree(tiny_model_dir("llama-gqa-untied")[0], folder)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture
def written(monkeypatch) -> list[int]:
    """The highest logical KV slot (a request's own slot index) of every pass the model makes while the test runs."""
    slots: list[int] = []
    init = PagedStep.__init__

    def spy(self, segments, *args, **kwargs):
        slots.extend(seg.base + len(seg.positions) - 1 for seg in segments)
        return init(self, segments, *args, **kwargs)

    monkeypatch.setattr(PagedStep, "__init__", spy)
    return slots


def _ids(n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def test_generation_fills_the_context_window_to_its_last_slot(tiny_folder, written):
    """``max_model_len=N``: a prompt of N - k tokens generates exactly k tokens (finish "length") - the
    tokens an unbounded run starts with - and the KV cache is never written past slot N - 1."""
    llm, free = LLM(str(tiny_folder), max_model_len=N), LLM(str(tiny_folder))
    assert llm.engine.max_model_len == N and free.engine.max_model_len == 256   # the model's own limit
    for k in (1, 2, 5):
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        written.clear()
        out = llm.generate([_ids(N - k)], params, use_tqdm=False)[0]
        assert (len(out.token_ids), out.finish_reason) == (k, "length")
        assert max(written) <= N - 1
        params.max_tokens = k
        assert out.token_ids == free.generate([_ids(N - k)], params, use_tqdm=False)[0].token_ids


def test_a_prompt_that_fills_the_window_is_refused_clearly(tiny_folder):
    llm = LLM(str(tiny_folder), max_model_len=N)
    for n in (N, N + 1):
        with pytest.raises(PromptTooLongError, match=f"the prompt has {n} tokens but the context window is {N} "):
            llm.generate([_ids(n)], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    out = LLM(str(tiny_folder)).generate([_ids(255)], SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)
    assert (len(out[0].token_ids), out[0].finish_reason) == (1, "length")   # the model's 256 positions
    with pytest.raises(PromptTooLongError, match="the prompt has 256 tokens but the context window is 256 "):
        LLM(str(tiny_folder)).generate([_ids(256)], use_tqdm=False)


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_drafts_near_the_end_of_the_window_stay_inside_it(tiny_folder, written, tree):
    """Speculating up to the window's end: output equals vanilla, every draft leaves room for the
    verdict's bonus token (len(context) + k <= N - 1), and no KV write goes past slot N - 1; a batch
    whose rows reach the end at different steps gives each row its output alone."""
    llm = LLM(str(tiny_folder), max_model_len=N)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    alone = {}
    for k in (2, 3, 6, 9):
        prompt = _ids(N - k)
        vanilla = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        assert len(vanilla) == k
        oracle = Oracle([prompt + vanilla], num_draft=6, tree=tree)
        written.clear()
        out = llm.generate([prompt], params, use_tqdm=False, speculative=oracle)[0]
        assert (out.token_ids, out.finish_reason) == (vanilla, "length")
        assert max(written) <= N - 1
        assert all(context + k <= N - 1 for _, context, k in oracle.calls), oracle.calls
        assert len(oracle.calls) > 0 or k == 2   # 2 tokens: the prefill's and one decode step, nothing to draft
        alone[k] = prompt, vanilla
    prompts = [alone[k][0] for k in (2, 9)]
    oracle = Oracle([alone[k][0] + alone[k][1] for k in (2, 9)], num_draft=6, tree=tree)
    outs = llm.generate(prompts, params, use_tqdm=False, speculative=oracle)
    assert [o.token_ids for o in outs] == [alone[2][1], alone[9][1]]
