"""Token Recycling: the adjacency matrix follows what the target computed, trees are grown best-first
from it within the cost-aware budget, acceptance rates are learnt, and greedy output equals vanilla."""
from __future__ import annotations

import pytest
import torch

from leaplm.errors import InvalidParamsError
from leaplm.speculative.drafters import TokenRecycling, make_drafter
from leaplm.speculative.tree import check_tree, depths

from .cases import greedy_equals_vanilla_on_ragged_batch, hot_start_int8_exact, sampled_runs_are_reproducible


def _drafter(**knobs) -> TokenRecycling:
    d = TokenRecycling(**{"num_draft": 6, "top_k": 2, "node_cost": 0.0, **knobs})
    # the target's candidates: after 5 -> (6, 7); after 6 -> (8, 9); after 7 -> (9, 6); after 8 -> (5, 6)
    d.observe(0, [5, 6, 7, 8], torch.tensor([[6, 7], [8, 9], [9, 6], [5, 6]]))
    return d


def test_trees_are_grown_best_first_from_the_matrix():
    d = _drafter()
    draft = d.propose(0, [1, 2, 5], 6)
    check_tree(draft.tokens, draft.parents)
    # by prior path probability: 6 (rank 0), 8 (0.45^2), 7 (rank 1 at the root, 0.15), 5 (0.45^3) ...
    assert draft.tokens[:4] == [6, 8, 7, 5] and draft.parents[:4] == [-1, 0, -1, 1]
    assert len(draft.tokens) == 6
    assert d.propose(1, [3], 6).tokens == []          # nothing known after token 3
    assert len(d.propose(0, [5], 2).tokens) == 2      # the engine's budget wins


def test_observe_overwrites_a_token_s_candidates():
    d = _drafter()
    d.observe(0, [5], torch.tensor([[9, 8]]))
    assert d.propose(2, [5], 1).tokens == [9]
    assert d.next_tokens.shape[1] == 2 and d.next_tokens[3].tolist() == [-1, -1]


def test_costly_nodes_shrink_the_tree():
    assert _drafter(node_cost=10.0).propose(0, [5], 6).tokens == []          # never worth a wider pass
    small = _drafter(node_cost=0.3).propose(0, [5], 6).tokens
    assert 0 < len(small) < 6


def test_a_longer_context_makes_nodes_dearer_and_the_tree_smaller():
    from leaplm.speculative.cost import PassCost

    d = _drafter(prompt=False)
    d._pass_cost = PassCost([1.0 + 0.02 * n for n in range(7)], [1.0 + 0.1 * n for n in range(7)], 256, 1024)
    short = d.propose(0, [7] * 200 + [5], 6).tokens
    long = d.propose(1, [7] * 1500 + [5], 6).tokens
    assert len(short) == 6 and 0 < len(long) < len(short)


def test_acceptance_rates_are_learnt_from_the_accepted_branch():
    d = _drafter()
    draft = d.propose(0, [5], 6)
    before = d.acceptance().copy()
    # the target accepted the rank-1 child of the root (7), then said 4 (not in the tree)
    d.propose(0, [5, 7, 4], 6)
    after = d.acceptance()
    assert after[1, 1] > before[1, 1] and after[1, 0] < before[1, 0]
    assert after[2, 0] < before[2, 0]          # depth 2 was reached under 7 and missed
    assert max(depths(draft.parents)) >= 2


def test_bad_knobs_are_refused():
    for knobs in ({"num_draft": 0}, {"top_k": 0}, {"top_k": 100}, {"node_cost": -1}, {"context": 0},
                  {"context": 9}, {"prompt": "maybe"}, {"context": 1, "prompt": True}):
        with pytest.raises(InvalidParamsError, match="recycling"):
            TokenRecycling(**knobs)
    assert isinstance(make_drafter("token_recycling"), TokenRecycling)
    assert TokenRecycling().lookup_mode == "first" and TokenRecycling(lookup=False).lookup is None   # the default


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3", "qwen3-qknorm"])
def test_greedy_recycling_equals_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], TokenRecycling(num_draft=12, node_cost=0.0))
    assert sum(r.accepted for r in spec) > 0


def test_the_paper_s_matrix_alone_equals_vanilla(tiny_model_dir):
    d = TokenRecycling(num_draft=12, node_cost=0.0, context=1, prompt=False)
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir("llama-gqa-untied")[0], d)
    assert sum(r.accepted for r in spec) > 0 and d.contexts == []
    assert not TokenRecycling(context=1).prompt and TokenRecycling().prompt   # prompt rows need 2+ tokens


def test_context_rows_tell_apart_two_occurrences_of_a_token():
    d = TokenRecycling(num_draft=4, top_k=2, node_cost=0.0, prompt=False)
    assert d.propose(0, [1, 5], 4).tokens == []                 # nothing known yet
    d.observe(0, [5], torch.tensor([[6, 7]]))                    # after 1, 5 the target said 6, 7
    d.start(1, None)
    first = d.propose(1, [2, 5], 4)
    assert first.tokens[0] == 6                                  # 2, 5 is new: the matrix's row for 5
    d.observe(1, [5] + first.tokens, torch.tensor([[8, 9]] + [[3, 4]] * len(first.tokens)))   # after 2, 5: 8, 9
    assert d.next_tokens[5].tolist() == [8, 9]                   # the matrix keeps the latest occurrence only
    assert d.propose(2, [1, 5], 1).tokens == [6]                 # ... the 2-token context row tells them apart
    assert d.propose(3, [2, 5], 1).tokens == [8]
    assert d.propose(4, [3, 5], 1).tokens == [8]                 # an unseen context: the matrix


def test_prompt_rows_draft_what_the_output_copies_and_learn_their_own_rate():
    context = [1, 2, 3, 4, 9, 1, 2]
    d = TokenRecycling(num_draft=4, top_k=2, node_cost=0.0, lookup=False)   # the rows, not a lookup chain
    draft = d.propose(0, context, 3)
    assert draft.tokens == [3, 4, 9] and draft.parents == [-1, 0, 1]   # the prompt's continuation of 1, 2
    assert set(d._last[0].sources) == {d.prompt_source}
    before = d.acceptance(d.prompt_source)[1, 0]
    d.propose(0, context + [3, 4, 9, 1], 3)                      # all three accepted
    assert d.acceptance(d.prompt_source)[1, 0] > before
    assert TokenRecycling(num_draft=4, top_k=2, node_cost=0.0, prompt=False, lookup=False).propose(
        0, context, 3).tokens == []


def test_a_row_that_keeps_its_best_candidate_gets_its_own_rate():
    d = _drafter()
    assert d._row((6,), 5)[1] == 0                                  # seen once
    d.observe(0, [5], torch.tensor([[6, 9]]))                    # the same best candidate again
    assert d._row((6,), 5)[1] == 1
    d.observe(0, [5], torch.tensor([[7, 6]]))                    # a new one: unsettled again
    assert d._row((6,), 5)[1] == 0


def test_hot_start_across_requests_and_int8_exactness(tiny_model_dir):
    hot_start_int8_exact(tiny_model_dir("llama-gqa-untied")[0], TokenRecycling(num_draft=10, node_cost=0.0))


def test_sampling_with_recycling_is_reproducible(tiny_model_dir):
    sampled_runs_are_reproducible(tiny_model_dir("qwen2-bias")[0], lambda: TokenRecycling(num_draft=8, node_cost=0.0))


def test_lookup_first_drafts_the_copy_when_there_is_one(tiny_model_dir):
    d = _drafter(lookup=True)
    assert d.propose(0, [5, 6, 7, 8, 1, 5, 6], 3).tokens == [7, 8, 1]      # a 2-gram seen before: copied
    assert d.propose(1, [3, 5], 6).is_tree                                  # no copy: the recycled tree
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir("llama-gqa-untied")[0],
                                                    TokenRecycling(num_draft=12, node_cost=0.0, lookup=True))
    assert sum(r.accepted for r in spec) > 0


def test_lookup_first_cuts_the_copy_by_its_learnt_rate_and_cost():
    d = _drafter(lookup=True, num_draft=8, node_cost=0.15)
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]            # the copy would be 3 .. 10, 1, 2
    first = d.propose(0, context, 8).tokens
    assert 1 <= len(first) < 8 and first == [3, 4, 5, 6, 7, 8, 9, 10][:len(first)]   # prior 0.5 per token
    for _ in range(30):                                          # every copied token accepted, every time
        d.propose(0, context + context[2:2 + len(first)], 8)
        first = d.propose(0, context, 8).tokens
    assert len(first) == 8                                       # a reliable copy earns its full length
    assert _drafter(lookup=True, node_cost=10.0).propose(0, context, 6).tokens == []   # never worth a pass


def test_lookup_merge_makes_the_copy_one_branch_of_the_tree():
    d = _drafter(lookup="merge", prompt=False)      # (prompt rows would draft the same copy from the tree)
    # context ends in 5, 6, seen before followed by 9, 2: the copy is [9, 2]; the matrix offers 8, 9 after 6
    draft = d.propose(0, [5, 6, 9, 2, 4, 5, 6], 6)
    check_tree(draft.tokens, draft.parents)
    tops = [t for t, p in zip(draft.tokens, draft.parents) if p == -1]
    assert sorted(tops) == [8, 9]                                # the copy's 9 merged with the matrix's 9
    nine = draft.tokens.index(9)
    assert draft.parents[draft.tokens.index(2)] == nine         # the copy goes on under the merged node
    assert d._last[0].ranks[nine] in (1, d.top_k)               # one node, one rank label


def test_lookup_merge_learns_the_copy_rate_and_is_exact(tiny_model_dir):
    d = _drafter(lookup="merge", prompt=False)
    d.propose(0, [1, 2, 3, 7, 1, 2], 6)                          # copy [3, 7, ...]: 3 is unknown to the matrix
    before = d.acceptance()[1, d.top_k]
    d.propose(0, [1, 2, 3, 7, 1, 2, 3, 7], 6)                   # the copy was right twice
    assert d.acceptance()[1, d.top_k] > before
    for name in ("llama-gqa-untied", "mistral-sliding"):
        _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0],
                                                        TokenRecycling(num_draft=16, node_cost=0.0, lookup="merge"))
        assert sum(r.accepted for r in spec) > 0
    hot_start_int8_exact(tiny_model_dir("llama-gqa-untied")[0], TokenRecycling(num_draft=10, node_cost=0.0, lookup="merge"))


def test_bad_lookup_mode_is_refused():
    with pytest.raises(InvalidParamsError, match="lookup"):
        TokenRecycling(lookup="sometimes")
    assert TokenRecycling(lookup="true").lookup_mode == "first"
