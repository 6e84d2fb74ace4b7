"""ADED: tri-gram statistics learnt from the context with decay, trees grown best-first with a UCB
exploration bonus within the budget, learning from the accepted branch, and greedy output equal to
vanilla (float and int8 targets)."""
from __future__ import annotations

import pytest
import torch

from leaplm.errors import InvalidParamsError
from leaplm.speculative.drafters.aded import ADED
from leaplm.speculative.tree import check_tree, depths

from .cases import greedy_equals_vanilla_on_ragged_batch, hot_start_int8_exact, sampled_runs_are_reproducible


def _drafter(**knobs) -> ADED:
    return ADED(**{"num_draft": 8, "node_cost": 0.0, "decay": 1.0, "exploration": 0.0, **knobs})


def test_trigram_and_bigram_counts_with_backoff():
    d = _drafter()
    d.propose(0, [1, 2, 3, 9, 1, 2, 3, 1, 2, 4, 7, 2], 0)    # k = 0: only ingests
    assert d.trigrams[(1, 2)].counts == {3: 2.0, 4: 1.0}
    assert d.bigrams[2].counts == {3: 2.0, 4: 1.0}
    assert (7, 2) not in d.trigrams            # nothing followed it yet
    assert d.clock == 11
    # p(c | 1 2) = (n3 + p2) / (N3 + 1), p2(c | 2) = n2 / (N2 + 1)
    est = d.estimate(1, 2)
    assert est[3] == pytest.approx((2 + 2 / 4) / 4) and est[4] == pytest.approx((1 + 1 / 4) / 4)
    # an unseen pair backs off to the bi-gram entirely
    assert d.estimate(5, 2) == pytest.approx({3: 2 / 4, 4: 1 / 4})
    # a continuation only the bi-gram knows joins the pair's candidates, scaled by the back-off mass
    d.propose(0, [1, 2, 3, 9, 1, 2, 3, 1, 2, 4, 7, 2, 8], 0)
    est = d.estimate(1, 2)
    assert set(est) == {3, 4, 8} and est[8] == pytest.approx((1 / 5) / 4)
    # the same context is not counted twice; a foreign context on the row is counted from scratch
    clock = d.clock
    d.propose(0, [1, 2, 3, 9, 1, 2, 3, 1, 2, 4, 7, 2, 8], 0)
    assert d.clock == clock
    d.propose(0, [5, 6, 7], 0)
    assert d.clock == clock + 2 and d.trigrams[(5, 6)].counts == {7: 1.0}


def test_counts_decay_so_recent_continuations_win():
    flat, decayed = _drafter(), _drafter(decay=0.5)
    ctx = [1, 2, 3, 5, 6, 1, 2, 4]
    for d in (flat, decayed):
        d.propose(0, ctx, 0)
    assert flat.estimate(1, 2)[3] == pytest.approx(flat.estimate(1, 2)[4])
    est = decayed.estimate(1, 2)
    assert est[4] > est[3]
    entry = decayed.trigrams[(1, 2)]
    assert entry.counts[3] == pytest.approx(0.5 ** 5) and entry.counts[4] == pytest.approx(1.0)
    # long unused counts fade out completely
    decayed.propose(1, list(range(20, 40)), 0)
    assert decayed.estimate(1, 2) == {}
    assert decayed.trigrams[(1, 2)].counts == {}


def test_capacity_keeps_the_most_recently_updated_pairs():
    d = _drafter(capacity=3)
    d.propose(0, [1, 2, 3, 1, 2, 4, 5, 6], 0)   # updates: (1,2) (2,3) (3,1) (1,2) again (2,4) (4,5)
    assert list(d.trigrams) == [(1, 2), (2, 4), (4, 5)]     # (1,2) was used again: (2,3) and (3,1) went
    d.propose(1, [7, 8, 9, 10], 0)
    assert list(d.trigrams) == [(4, 5), (7, 8), (8, 9)]


def test_trees_respect_budget_topology_and_depth():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        ctx = torch.randint(0, 6, (60,), generator=gen).tolist()
        num_draft, max_depth = 1 + trial % 12, 1 + trial % 4
        d = _drafter(num_draft=num_draft, max_depth=max_depth, exploration=0.3 * (trial % 2))
        for k in (1, 3, 30):
            draft = d.propose(0, ctx, k)
            parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
            check_tree(draft.tokens, parents)   # parents[i] < i, siblings distinct
            assert 0 < len(draft.tokens) <= min(k, num_draft)
            assert max(depths(parents)) <= max_depth
            ctx = ctx + [draft.tokens[0], int(torch.randint(0, 6, (1,), generator=gen))]


def test_best_first_order_and_chains():
    d = _drafter(num_draft=5)
    # after 1 2: 3 (p = 0.625) before 5 (0.3125); the line 3 4 1 2 is likely enough to come before 5
    # (0.625 * 0.889 * 0.889 * 0.933 = 0.46), then 3 under it (0.29) loses to 5
    draft = d.propose(0, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 6, 9, 9, 1, 2], 5)
    assert draft.tokens == [3, 4, 1, 2, 5] and draft.parents == [-1, 0, 1, 2, -1]
    # one known line makes a plain chain
    d = _drafter(num_draft=3)
    assert d.propose(0, [1, 2, 3, 4, 1, 2], 3).parents is None
    assert d.propose(0, [1, 2, 3, 4, 1, 2], 3).tokens == [3, 4, 1]
    assert _drafter().propose(0, [42], 5).tokens == []                  # nothing known after 42


def test_exploration_bonus_tries_rarely_drafted_continuations():
    def drafted(exploration: float) -> list[int]:
        d = _drafter(num_draft=1, exploration=exploration)
        ctx = [1, 2, 4, 8] + [1, 2, 3, 8] * 6 + [1, 2]
        picks = []
        for _ in range(30):
            draft = d.propose(0, ctx, 1)
            picks.append(draft.tokens[0])
            ctx = ctx + [3, 8, 1, 2]          # the target keeps writing 3 after "1 2"
        return picks

    greedy, explore = drafted(0.0), drafted(1.0)
    assert set(greedy) == {3}
    assert 4 in explore and explore.count(3) > explore.count(4)
    # the bonus grows with the pair's use and shrinks with the child's tries
    d = _drafter(exploration=0.5)
    d.propose(0, [1, 2, 3, 1, 2, 3, 1, 2, 4], 0)
    entry = d.trigrams[(1, 2)]
    entry.visits, entry.tries = 10, {3: 10}
    (s3, p3, t3), (s4, p4, t4) = sorted(d.candidates(1, 2), key=lambda x: x[2])
    assert p3 > p4 and s4 > s3
    assert s4 - p4 == pytest.approx(0.5 * (torch.log1p(torch.tensor(10.0)).item()) ** 0.5)


def test_learning_from_the_accepted_branch():
    d = _drafter(num_draft=8)
    ctx = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 6, 9, 1, 2]
    draft = d.propose(0, ctx, 8)
    check_tree(draft.tokens, draft.parents)
    roots = {draft.tokens[i]: i for i, p in enumerate(draft.parents) if p == -1}
    assert set(roots) == {3, 5} and [draft.tokens[i] for i, p in enumerate(draft.parents) if p == roots[5]] == [6]
    hits, visits = d._hits.copy(), d._visits.copy()
    p5 = d.estimate(1, 2)[5]
    # the target accepted 5 (the second child of the root), then wrote 7 (not in the tree)
    d.propose(0, ctx + [5, 7], 8)
    root = d.trigrams[(1, 2)]
    assert root.visits == 1 and root.tries == {3: 1, 5: 1}
    under5 = d.trigrams[(2, 5)]
    assert under5.visits == 1 and under5.tries == {6: 1}
    assert d.trigrams[(2, 3)].visits == 0 and not d.trigrams[(2, 3)].tries   # 3's subtree was never tested
    b5 = min(int(p5 * 10), 9)
    assert d._hits[b5] == hits[b5] + 1
    assert d._visits.sum() == visits.sum() + 3                                # 3, 5, then 6 under 5
    assert d._hits.sum() == hits.sum() + 1
    # the ingested outputs count too: 7 now follows 2 5
    assert d.trigrams[(2, 5)].counts == {6: 1.0, 7: 1.0}
    # a new request on the row keeps the shared statistics
    d.reset(0)
    assert sorted(d.propose(0, [8, 1, 2], 6).tokens[:2]) == [3, 5]     # 3 and 5 now both seen twice


def test_calibration_learns_overconfident_estimates():
    d = _drafter(num_draft=1)
    before = [d.calibrated(p) for p in (0.05, 0.75)]
    assert before == pytest.approx([0.05, 0.75])                 # the prior: the estimate itself
    for step in range(40):                       # pairs seen once (p = 0.75) whose continuation never recurs
        ctx = [100 + step, 200 + step, 300 + step, 100 + step, 200 + step]
        assert d.propose(step, ctx, 1).tokens == [300 + step]
        assert d.estimate(100 + step, 200 + step)[300 + step] == pytest.approx(0.75)
        d.propose(step, ctx + [999], 0)
    assert d.calibrated(0.75) < 0.1 and d.calibrated(0.05) == pytest.approx(0.05)


def test_costly_nodes_shrink_the_tree():
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]     # one line, every step seen once: p = 0.75
    assert _drafter(node_cost=10.0).propose(0, ctx, 8).tokens == []            # never worth a wider pass
    small = _drafter(node_cost=0.3).propose(0, ctx, 8).tokens
    assert 0 < len(small) < 8
    assert len(_drafter().propose(0, ctx, 8).tokens) == 8


def test_bad_knobs_are_refused():
    for knobs in ({"num_draft": 0}, {"num_draft": 2.5}, {"max_depth": 0}, {"capacity": 0}, {"exploration": -1},
                  {"decay": 0}, {"decay": 1.5}, {"smoothing": 0}, {"node_cost": -1}, {"node_cost": "x"},
                  {"num_draft": True}, {"exploration": float("nan")}):
        with pytest.raises(InvalidParamsError, match="aded"):
            ADED(**knobs)
    assert ADED().name == "aded"


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3"])
def test_greedy_aded_equals_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], ADED(num_draft=12, node_cost=0.0))
    assert sum(r.accepted for r in spec) > 0


def test_hot_start_across_requests_and_int8_exactness(tiny_model_dir):
    hot_start_int8_exact(tiny_model_dir("llama-gqa-untied")[0], ADED(num_draft=10, node_cost=0.0))


def test_sampling_with_aded_runs(tiny_model_dir):
    sampled_runs_are_reproducible(tiny_model_dir("qwen2-bias")[0], lambda: ADED(num_draft=8, node_cost=0.0))
