"""Drafter contract v2: the engine tells each drafter what it committed (every fed token once, in order, then the
accepted drafts), hands ``needs_hidden`` drafters the target's final hidden states of exactly those tokens, and
batches proposals per drafter (``propose_batch``)."""
from __future__ import annotations

import pytest
import torch

from leaplm import SamplingParams
from leaplm.cache.kv import KVCache
from leaplm.engine import LLMEngine
from leaplm.models.load import build_model
from leaplm.speculative.drafters import Draft, Drafter

from ..engine_helpers import Oracle


class Recorder(Drafter):
    """Drafts the known answer with a wrong token now and then (via ``Oracle``), in trees or chains, and records
    every call of the v2 contract."""

    name = "recorder"
    needs_hidden = True

    def __init__(self, answers, tree: bool) -> None:
        self.oracle = Oracle(answers, num_draft=5, tree=tree)
        self.num_draft = 5
        self.committed_log: dict[int, list[tuple[list[int], torch.Tensor | None]]] = {}
        self.starts: dict[int, list[int]] = {}
        self.batches: list[list[int]] = []

    def propose(self, row, context, k):
        return self.oracle.propose(row, context, k)

    def propose_batch(self, rows, contexts, ks):
        self.batches.append(list(rows))
        return super().propose_batch(rows, contexts, ks)

    def committed(self, row, tokens, hidden=None, start=None):
        self.committed_log.setdefault(row, []).append((list(tokens), hidden))
        self.starts.setdefault(row, []).append(start)


def _reference_hidden(model, tokens: list[int]) -> torch.Tensor:
    """Final hidden states of every token of ``tokens`` from one plain full pass ``[T, H]``."""
    cache = KVCache.for_model(model.config, 1, len(tokens), model.dtype, model.device)
    ids = torch.tensor([tokens])
    positions = torch.arange(len(tokens))[None]
    from leaplm.models.transformer import _Step

    step = _Step(positions, model.config, len(tokens), 0)
    with torch.inference_mode():
        _, hidden = model.layers_forward(ids, positions, cache, step, None, torch.arange(len(tokens))[None])
    return hidden[0]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_committed_tokens_and_their_hidden_states_reach_the_drafter(tree, compiled, tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    if compiled:
        model.compile()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (23, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    alone = []
    for p in prompts:
        engine = LLMEngine(model, eos_token_ids=[2], goodput=False)
        rid = engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
        alone.append(engine.get_request(rid).output_ids)
    drafter = Recorder([p + a for p, a in zip(prompts, alone)], tree=tree)
    engine = LLMEngine(model, eos_token_ids=[2], goodput=False, prefill_chunk=16, block_size=4)
    rids = [engine.add_request(p, params, speculative=drafter) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    for rid, prompt, expected in zip(rids, prompts, alone):
        r = engine.get_request(rid)
        assert r.output_ids == expected
        log = drafter.committed_log[rid]
        committed = [t for tokens, _ in log for t in tokens]
        # every token but the last output (sampled by the last step, never fed) is committed once, in order
        assert committed == (prompt + expected)[:-1]
        # each call says where its first token sits: right after the tokens committed before it
        assert drafter.starts[rid] == [sum(len(t) for t, _ in log[:i]) for i in range(len(log))]
        assert len(log) > 3 and r.accepted > 0          # chunks, then verdicts with accepted drafts
        hidden = torch.cat([h for _, h in log])
        ref = _reference_hidden(model, committed)
        assert hidden.shape == ref.shape
        torch.testing.assert_close(hidden, ref, atol=2e-4, rtol=2e-4)
    # one propose_batch per step for all speculating requests of the drafter
    assert max(len(b) for b in drafter.batches) > 1
    assert all(len(b) == len(set(b)) for b in drafter.batches)


def test_a_drafter_without_needs_hidden_gets_none(tiny_model_dir):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    seen = []

    class Plain(Drafter):
        num_draft = 3

        def propose(self, row, context, k):
            return Draft([])

        def committed(self, row, tokens, hidden=None, start=None):
            seen.append(hidden)

    engine = LLMEngine(model, eos_token_ids=[2])
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), speculative=Plain())
    while engine.has_unfinished():
        engine.step()
    assert seen and all(h is None for h in seen)
