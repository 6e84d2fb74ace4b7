"""Lookahead decoding: the Jacobi window moves with what the engine committed, n-grams are harvested along
the trajectory's diagonals into a capped pool, verification candidates merge into a trie that the
lookahead chain shares, trees respect the budget, the engine's observe calls line up with the draft,
and greedy output equals vanilla (float and int8 targets)."""
from __future__ import annotations

import pytest
import torch

from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import make_drafter
from leaplm.speculative.drafters.lookahead import Lookahead, _Level
from leaplm.speculative.tree import check_tree, depths, path_to

from .cases import greedy_equals_vanilla_on_ragged_batch, hot_start_int8_exact, sampled_runs_are_reproducible


def _parents(draft) -> list[int]:
    return draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))


def _observe(d: Lookahead, row: int, root: int, draft, outputs: list[int], pending: list[int] | None = None) -> None:
    """What the engine does after a pass: fed = pending token(s) + every node, top-1 after each."""
    fed = (pending or [root]) + list(draft.tokens)
    assert len(outputs) == len(fed)
    d.observe(row, fed, torch.tensor(outputs)[:, None])


def test_jacobi_window_shifts_by_what_was_committed():
    d = Lookahead(window=4, ngram=3, max_candidates=0, num_draft=8)    # no pool: a pure Jacobi chain
    ctx = [10, 11, 12, 13]
    draft = d.propose(0, ctx, 8)
    assert not draft.is_tree and len(draft.tokens) == 4                # the window, fed as one chain
    assert set(draft.tokens) <= set(ctx)                               # first guesses: drawn from the context
    _observe(d, 0, 13, draft, [100, 101, 102, 103, 104])
    # one token committed (the target's own, y_0): the window is the Jacobi update y_1 .. y_4
    ctx = ctx + [100]
    draft = d.propose(0, ctx, 8)
    assert draft.tokens == [101, 102, 103, 104]
    _observe(d, 0, 100, draft, [200, 201, 202, 203, 204])
    # three committed: y_3, y_4 survive at their positions, two fresh guesses pad the end
    ctx = ctx + [101, 102, 201]
    draft = d.propose(0, ctx, 8)
    assert draft.tokens[:2] == [203, 204] and len(draft.tokens) == 4
    assert set(draft.tokens[2:]) <= set(ctx)
    # no pass came back (nothing observed): the old guesses move on unchanged
    ctx = ctx + [203]
    assert d.propose(0, ctx, 8).tokens[:1] == [204]
    # more committed than the window covered: all fresh
    ctx = ctx + [7] * 9
    draft = d.propose(0, ctx, 8)
    assert len(draft.tokens) == 4 and set(draft.tokens) <= set(ctx)
    # another context on the row (a new request without reset): a fresh window, history dropped
    d._rows[0].levels.append("stale")
    draft = d.propose(0, [50, 51], 8)
    assert set(draft.tokens) <= {50, 51} and not d._rows[0].levels


def test_padding_continues_from_the_pool_and_shorter_budgets_cut_the_chain():
    d = Lookahead(window=4, ngram=3, max_candidates=2, num_draft=8, context_ngrams=False)
    ctx = [10, 11, 12, 13]
    draft = d.propose(0, ctx, 8)
    _observe(d, 0, 13, draft, [100, 101, 102, 103, 104])
    d.add_ngram([104, 7, 8])
    # two committed: y_2 .. y_4 survive, then the pool's continuation of 104
    assert d.propose(0, ctx + [100, 101], 8).tokens == [102, 103, 104, 7]
    # a budget of 2 feeds g_0, g_1; the outputs replace them, the unfed guesses stay
    draft = d.propose(1, [50, 51, 52], 2)
    assert len(draft.tokens) == 2
    guesses = list(d._rows[1].guesses)
    _observe(d, 1, 52, draft, [60, 61, 62])
    assert d._rows[1].guesses == [60, 61, 62] + guesses[3:]
    assert d.propose(1, [50, 51, 52, 60], 8).tokens[:3] == [61, 62] + guesses[3:4]


def test_observe_ignores_passes_it_did_not_draft():
    d = Lookahead(window=3, ngram=2, max_candidates=0)
    draft = d.propose(0, [1, 2, 3], 8)
    guesses = list(d._rows[0].guesses)
    d.observe(0, [3] + draft.tokens[:1], torch.tensor([[9], [9]]))   # a grammar pruned the draft
    assert d._rows[0].guesses == guesses and not d.pool
    d.observe(0, [3] + draft.tokens, torch.tensor([[9]] * 4))         # already settled: ignored
    assert d._rows[0].guesses == guesses
    d.observe(5, [3], torch.tensor([[9]]))                             # a prefill of another row: nothing
    # several pending tokens (jump-forward): the draft hangs off the last one
    draft = d.propose(0, [1, 2, 3, 4], 8)
    assert len(draft.tokens) == 3
    _observe(d, 0, 4, draft, [77, 40, 41, 42, 43], pending=[9, 4])
    assert d._rows[0].guesses == [40, 41, 42, 43]


def test_ngrams_are_harvested_along_the_diagonals():
    d = Lookahead(window=4, ngram=3, max_candidates=8, num_draft=8, context_ngrams=False)
    ctx = [10, 11, 12, 13, 14]
    first = d.propose(0, ctx, 8)
    a = first.tokens                                  # level 0: guesses at positions 5..8
    y = [100, 101, 102, 103, 104]                     # outputs: y_i at position 5 + i
    _observe(d, 0, 14, first, y)
    assert not d.pool                                 # N - 2 = 1 warm-up pass: no n-gram yet
    ctx = ctx + [100]
    b = d.propose(0, ctx, 8)
    assert b.tokens == y[1:]                          # level 1: y_1 .. y_4 at positions 6..9
    z = [200, 201, 202, 203, 204]                     # outputs: z_i at position 6 + i
    _observe(d, 0, 100, b, z)
    # (level 0 at p, level 1 at p + 1, outputs at p + 2) for p = 5..8
    assert _pooled(d) == {(a[i], (y[i + 1], z[i + 1])) for i in range(4)}
    # positions are absolute: two tokens committed, the window (level 2) starts at 8
    ctx = ctx + [201, 202]
    c = d.propose(0, ctx, 8)
    assert c.tokens[:3] == z[2:] and len(c.tokens) == 4 and not c.is_tree
    d.pool.clear()
    d.pool_count = 0
    u = [300, 301, 302, 303, 304]                     # outputs: u_i at position 8 + i
    _observe(d, 0, 202, c, u)
    # level 1 (y_1..y_4 at 6..9), level 2 (z_2, z_3, z_4, fresh at 8..11), u at 8..12: p = 7, 8, 9
    assert _pooled(d) == {(y[2], (z[2], u[1])), (y[3], (z[3], u[2])), (y[4], (z[4], u[3]))}


def _pooled(d: Lookahead) -> set:
    return {(key, tail) for key, tails in d.pool.items() for tail in tails}


def test_harvest_needs_every_level_at_its_position():
    d = Lookahead(ngram=4, max_candidates=4)
    levels = [_Level(0, [1, 2, 3]), _Level(1, [4, 5]), _Level(3, [6, 7])]
    # p = 0: level 2 has no position 2; p = 1: 2@1 5@2 6@3 10@4; p = 2: level 1 has no position 3
    assert d.harvest(levels, _Level(2, [8, 9, 10, 11])) == 1
    assert d.candidates(2) == [(5, 6, 10)]
    assert d.harvest(levels[:2], _Level(0, [1])) == 0          # not N levels: nothing


def test_pool_keeps_the_recent_tails_under_a_global_cap():
    d = Lookahead(ngram=3, max_candidates=2, pool_size=5)
    for tail in ((2, 3), (2, 4), (2, 5)):
        d.add_ngram((1,) + tail)
    assert d.candidates(1) == [(2, 5), (2, 4)]                 # G = 2 most recent, newest first
    d.add_ngram((1, 2, 4))
    assert d.candidates(1) == [(2, 4), (2, 5)] and d.pool_count == 2
    d.add_ngram((7, 8, 9))
    d.add_ngram((6, 8, 9))
    d.add_ngram((6, 1, 1))
    assert d.pool_count == 5
    d.add_ngram((5, 5, 5))                                      # 6 n-grams: key 1 (least recent) loses its oldest
    assert d.pool_count == 5 and d.candidates(1) == [(2, 4)]
    d.add_ngram((4, 4, 4))
    assert 1 not in d.pool and d.pool_count == 5
    assert sum(len(t) for t in d.pool.values()) == d.pool_count
    assert Lookahead(max_candidates=0).add_ngram((1, 2, 3, 4)) is None and not Lookahead(max_candidates=0).pool


def test_context_ngrams_are_pooled_incrementally():
    d = Lookahead(ngram=3, max_candidates=4, window=1)
    d.propose(0, [1, 2, 3, 1, 2, 4], 0)
    assert d.candidates(1) == [(2, 4), (2, 3)] and d.candidates(2) == [(3, 1)] and d.candidates(4) == []
    count = d.pool_count
    d.propose(0, [1, 2, 3, 1, 2, 4], 0)                    # nothing new
    assert d.pool_count == count
    d.propose(0, [1, 2, 3, 1, 2, 4, 9], 0)
    assert d.candidates(2) == [(4, 9), (3, 1)]
    off = Lookahead(ngram=3, context_ngrams=False)
    off.propose(0, [1, 2, 3, 1, 2, 4], 0)
    assert not off.pool


def test_trie_merges_candidates_and_the_chain_reuses_its_nodes():
    d = Lookahead(window=4, ngram=4, max_candidates=3, num_draft=12, context_ngrams=False)
    for gram in ((5, 6, 7, 8), (5, 6, 9, 1), (5, 2, 3, 4)):
        d.add_ngram(gram)
    draft = d.propose(0, [3, 5], 12)
    tokens, parents = draft.tokens, _parents(draft)
    check_tree(tokens, parents)
    # candidates newest first: 2 3 4 | 6 9 1 | 6 7 8 (the 6 is shared)
    assert tokens[:8] == [2, 3, 4, 6, 9, 1, 7, 8] and parents[:8] == [-1, 0, 1, -1, 3, 4, 3, 6]
    # a fresh window follows the pool's newest tail, so it runs through the trie: one new node
    st = d._rows[0]
    assert st.guesses[:3] == [2, 3, 4] and st.chain == [0, 1, 2, 8] and len(tokens) == 9 and parents[8] == 2
    # a window that diverges inside the trie: shared nodes reused, then its own nodes
    st.tokens, st.guesses = None, [6, 9, 2, 2]
    draft = d.propose(0, [3, 5], 12)                  # same position: the pinned guesses stand
    tokens, parents = draft.tokens, _parents(draft)
    check_tree(tokens, parents)
    assert tokens == [2, 3, 4, 6, 9, 1, 7, 8, 2, 2] and parents[8:] == [4, 8]
    assert st.chain == [3, 4, 8, 9] and path_to(parents, 9) == [3, 4, 8, 9]


def test_chain_through_existing_nodes_costs_no_budget():
    d = Lookahead(window=4, ngram=3, max_candidates=2, num_draft=5, context_ngrams=False)
    d.add_ngram((5, 6, 7))
    d.add_ngram((5, 8, 9))
    d.propose(0, [5], 5)
    st = d._rows[0]
    st.tokens, st.guesses = None, [6, 7, 1, 2]
    st.start, st.root = 2, 5
    draft = d.propose(0, [4, 5], 5)        # same position: the pinned guesses stand
    # trie: 8 9 | 6 7 (4 nodes); the chain reuses 6 7 and adds 1, then the budget of 5 is spent
    assert draft.tokens == [8, 9, 6, 7, 1] and _parents(draft) == [-1, 0, -1, 2, 3]
    assert st.chain == [2, 3, 4]


def test_trees_respect_budget_topology_and_trie_priority():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        window, ngram, cands = 1 + trial % 5, 2 + trial % 4, trial % 4
        num_draft = 1 + (trial * 7) % 17
        d = Lookahead(window=window, ngram=ngram, max_candidates=cands, num_draft=num_draft, seed=trial)
        ctx = torch.randint(3, 9, (30,), generator=gen).tolist()
        for step in range(12):
            k = (1, 3, 40)[step % 3]
            draft = d.propose(0, ctx, k)
            parents = _parents(draft)
            check_tree(draft.tokens, parents)
            assert len(draft.tokens) <= min(k, num_draft)
            assert max(depths(parents), default=0) <= max(ngram - 1, window)
            tails = d.candidates(ctx[-1])
            if tails and min(k, num_draft) >= ngram - 1:      # the newest candidate is always there in full
                paths = {tuple(draft.tokens[j] for j in path_to(parents, i)) for i in range(len(parents))}
                assert tails[0] in paths
            chain = d._rows[0].chain
            assert [draft.tokens[i] for i in chain] == d._rows[0].guesses[: len(chain)]
            if chain:
                assert path_to(parents, chain[-1]) == chain
            outputs = torch.randint(3, 9, (1 + len(draft.tokens),), generator=gen).tolist()
            _observe(d, 0, ctx[-1], draft, outputs)
            ctx = ctx + outputs[: 1 + step % 3]
        assert d.pool_count == sum(len(t) for t in d.pool.values())


def test_bad_knobs_are_refused():
    for knobs in ({"window": 0}, {"ngram": 1}, {"max_candidates": -1}, {"num_draft": 0}, {"pool_size": 0},
                  {"seed": -1}, {"window": 2.5}, {"ngram": True}, {"context_ngrams": "maybe"}, {"num_draft": "8"}):
        with pytest.raises(InvalidParamsError, match="lookahead"):
            Lookahead(**knobs)
    with pytest.raises(InvalidParamsError, match="lookahead"):
        make_drafter({"method": "lookahead", "windw": 3})
    d = make_drafter({"method": "lookahead", "window": 3, "context_ngrams": "false"})
    assert isinstance(d, Lookahead) and d.window == 3 and d.context_ngrams is False and d.observe_topk == 1
    assert isinstance(make_drafter("lade"), Lookahead) and Lookahead().name == "lookahead"


def test_cli_and_bench_know_lookahead():
    from leaplm.bench.methods import METHODS, parse_method
    from leaplm.cli import build_parser
    from leaplm.cli_common import speculative_spec

    args = build_parser().parse_args(["generate", "--spec", "lookahead", "--num-draft", "12", "hi"])
    assert speculative_spec(args) == {"method": "lookahead", "num_draft": 12}
    assert METHODS["lookahead"].lossless
    run = parse_method("lookahead:window=5:ngram=3:max_candidates=4")
    assert run.knobs == {"window": 5, "ngram": 3, "max_candidates": 4}


class _Recorder(Lookahead):
    """Records every draft and every observe call, in order."""

    def __init__(self, **knobs) -> None:
        super().__init__(**knobs)
        self.log: list[tuple] = []

    def propose(self, row, context, k):
        draft = super().propose(row, context, k)
        self.log.append(("propose", row, list(context), list(draft.tokens), _parents(draft),
                         list(self._rows[row].chain)))
        return draft

    def observe(self, row, fed, topk):
        self.log.append(("observe", row, [int(t) for t in fed], topk[:, 0].tolist()))
        super().observe(row, fed, topk)


def test_engine_observes_the_root_then_every_node_in_draft_order(tiny_model_dir):
    """The order ``observe`` assumes: after each pass, fed = pending token + the draft's nodes; the target's
    argmax after the root is the next committed token, after each accepted node the token after it; and the
    next window starts with the outputs after the chain's nodes, shifted by what was committed."""
    engine = Engine(build_model(tiny_model_dir("llama-gqa-untied")[0]), eos_token_ids=[2])
    d = _Recorder(window=4, ngram=3, max_candidates=3, num_draft=10)
    prompts = [[7, 8, 9, 10] * 3, [30, 31, 32, 33, 34]]
    rows = engine.start(prompts, [SamplingParams(temperature=0, max_tokens=20)] * 2, d).run()
    passes = accepted_nodes = windows = 0
    for row, r in enumerate(rows):
        events = [e for e in d.log if e[1] == row]
        assert events[0][0] == "observe" and len(events[0][2]) == 1      # the prefill: last prompt token
        rest = events[1:]
        assert [e[0] for e in rest] == ["propose", "observe"] * (len(rest) // 2)
        proposals = rest[0::2]
        for i, (_, _, context, tokens, parents, chain) in enumerate(proposals):
            _, _, fed, best = rest[2 * i + 1]
            assert fed == [context[-1]] + tokens and len(best) == len(fed)
            after = proposals[i + 1][2] if i + 1 < len(proposals) else r.prompt_ids + r.output_ids
            grown = after[len(context):]                                 # what this pass committed
            assert best[0] == grown[0]                                   # y_0: the target's next token
            node = -1
            for depth, token in enumerate(grown[:-1], start=1):          # walk the accepted path
                node = next(j for j, p in enumerate(parents) if p == node and tokens[j] == token)
                assert best[1 + node] == grown[depth]
                accepted_nodes += 1
            outputs = [best[0]] + [best[1 + j] for j in chain]
            if i + 1 < len(proposals):
                _, _, _, next_tokens, _, next_chain = proposals[i + 1]
                window = [next_tokens[j] for j in next_chain]
                overlap = min(len(window), len(outputs) - len(grown))
                if overlap > 0:
                    assert window[:overlap] == outputs[len(grown):][:overlap]
                    windows += 1
            passes += 1
    assert passes == sum(r.target_passes - 1 for r in rows) and passes > 10
    assert accepted_nodes > 0 and windows > 0


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3"])
def test_greedy_lookahead_equals_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], Lookahead(window=4, num_draft=12))
    assert sum(r.accepted for r in spec) > 0


def test_hot_start_across_requests_and_int8_exactness(tiny_model_dir):
    hot_start_int8_exact(tiny_model_dir("llama-gqa-untied")[0], Lookahead(window=4, num_draft=12))


def test_sampling_with_lookahead_runs(tiny_model_dir):
    sampled_runs_are_reproducible(tiny_model_dir("qwen2-bias")[0], lambda: Lookahead(window=3, num_draft=8))
