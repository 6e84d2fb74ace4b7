"""Token Recycling's native loops (leaplm/native/recycling_ops.cpp) equal the drafter's Python reference:
a simulated decode (a Markov "target" whose top-k candidates depend on the last two tokens of each fed
token's path) drafts the same trees and leaves the same tables whichever runs, for every knob that
changes the loops (context rows, prompt rows, both lookup modes, several rows)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from leaplm import native
from leaplm.speculative.drafters import recycling
from leaplm.speculative.drafters.recycling import TokenRecycling

pytestmark = pytest.mark.skipif(os.environ.get("LEAPLM_NATIVE") == "0", reason="native ops disabled (LEAPLM_NATIVE=0)")
ops = torch.ops.leaplm_native if native.load() else None

V, K = 40, 4
_rng = np.random.default_rng(0)
# candidates of the "target" after the bigram (a, b): K distinct tokens, best first
CANDS = np.stack([np.stack([_rng.permutation(V)[:K] for _ in range(V)]) for _ in range(V)])


def _truth(path: list[int]) -> int:
    """The target's next token: mostly its best candidate, sometimes a lower one (seeded by the path)."""
    a, b = path[-2], path[-1]
    u = random.Random(hash((a, b, len(path) // 5))).random()
    rank = 0 if u < 0.6 else 1 if u < 0.8 else 2 if u < 0.9 else 3
    return int(CANDS[a, b, rank])


def _simulate(knobs: dict, steps: int = 40, rows: int = 2) -> tuple[list, TokenRecycling]:
    d = TokenRecycling(**{"num_draft": 10, "top_k": K, "node_cost": 0.05, **knobs})
    drafts = []
    for row in range(rows):
        gen = random.Random(row)
        prompt = [gen.randrange(V) for _ in range(30)]
        prompt += prompt[5:15]                       # something for prompt rows and lookup to copy
        d.observe(row, [prompt[-1]], torch.tensor(CANDS[prompt[-2], prompt[-1]][None]))   # the prefill
        context = prompt + [_truth(prompt)]
        pending = [context[-1]]
        for _ in range(steps):
            draft = d.propose(row, context, 10)
            parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
            paths = []
            for tok, p in zip(draft.tokens, parents):
                paths.append((context if p < 0 else paths[p]) + [tok])
            fed = pending + draft.tokens
            cands = [CANDS[context[-2], context[-1]]] + [CANDS[q[-2], q[-1]] for q in paths]
            d.observe(row, fed, torch.tensor(np.stack(cands)))
            node, accepted = -1, []
            while True:                               # the accepted path, then the target's own token
                want = _truth(context + accepted)
                kids = [i for i, p in enumerate(parents) if p == node and draft.tokens[i] == want]
                accepted.append(want)
                if not kids:
                    break
                node = kids[0]
            context += accepted
            pending = [accepted[-1]]
            drafts.append((draft.tokens, parents))
    return drafts, d


def _tables(d: TokenRecycling) -> list[np.ndarray]:
    return [d.next_tokens, d._level] + [a for t in d.contexts for a in (t.keys, t.rows, t.level)]


@pytest.mark.parametrize("knobs", [{}, {"prompt": False}, {"context": 1}, {"context": 3, "lookup": "first"},
                                   {"lookup": "merge"}, {"context": 8, "max_depth": 3}])
def test_native_loops_draft_and_learn_like_the_python_reference(knobs, monkeypatch):
    assert recycling._native_ops() is not None   # the native loops are what runs here
    fast, fast_drafter = _simulate(knobs)
    monkeypatch.setattr(recycling, "_native_ops", lambda *args: None)
    slow, slow_drafter = _simulate(knobs)
    assert fast == slow
    assert sum(len(tokens) for tokens, _ in fast) > 50          # trees were drafted, not only empty ones
    assert sum(len(set(parents)) > 1 and len(parents) != len(set(parents)) for _, parents in fast) > 0 or knobs.get(
        "lookup") == "first"                                      # some real trees (a node with 2+ children)
    for a, b in zip(_tables(fast_drafter), _tables(slow_drafter)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast_drafter.acceptance(None), slow_drafter.acceptance(None))


def test_a_repeated_token_keeps_its_last_candidates_with_a_level_from_the_old_row():
    """Within one observe a token fed twice keeps the later candidates (numpy's fancy-index write), its level
    computed from the row before the call, in both implementations."""
    results = []
    for use_native in (True, False):
        d = TokenRecycling(top_k=2, context=1)
        d.observe(0, [3], torch.tensor([[5, 6]]))
        if not use_native:
            recycling_ops, recycling._native_ops = recycling._native_ops, lambda *args: None
        try:
            d.observe(0, [3, 3], torch.tensor([[8, 9], [5, 7]]))
        finally:
            if not use_native:
                recycling._native_ops = recycling_ops
        results.append((d.next_tokens[3].tolist(), int(d._level[3])))
    assert results[0] == results[1] == ([5, 7], 1)   # 5 was the best before the call: settled


def test_bad_input_is_refused_clearly_and_a_short_matrix_asks_to_grow():
    d = TokenRecycling(top_k=2)
    d.observe(0, [3], torch.tensor([[5, 6]]))
    tables, counts = d._views(), d._counts
    with pytest.raises(RuntimeError, match="recycling tables"):
        ops.recycle_observe(tables[:3], [], [1], [-1], torch.tensor([[1, 2]]), 4, True)
    with pytest.raises(RuntimeError, match="parents must precede"):
        ops.recycle_observe(tables, [1], [1, 2], [1, 0], torch.tensor([[1, 2], [2, 3]]), 4, True)
    with pytest.raises(RuntimeError, match="ids must be"):
        ops.recycle_observe(tables, [], [1], [-1], torch.tensor([[1, 2, 3]]), 4, False)
    with pytest.raises(RuntimeError, match="counts"):
        ops.recycle_grow(tables, counts[:2], [3], [], d._cost_tensor(), 4, d.max_depth, 8, d.prompt_source, 4)
    rows = d.next_tokens.shape[0]
    before = d.next_tokens.copy()
    assert ops.recycle_observe(tables, [], [rows + 5], [-1], torch.tensor([[1, 2]]), 4, False) == rows + 6
    np.testing.assert_array_equal(d.next_tokens, before)          # nothing written
    d.observe(0, [rows + 5], torch.tensor([[1, rows + 9]]))        # the drafter grows its matrix and stores
    assert d.next_tokens.shape[0] == rows + 10 and d.next_tokens[rows + 5].tolist() == [1, rows + 9]
