"""RASD (draft-model tree + pruned retrieval tree, fused): the merge, the pruning, refused knobs, and in
the engine exact greedy output with tokens accepted from both sources, the draft cache in sync after
retrieval branches, reproducible sampling."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import RASD, make_drafter
from leaplm.speculative.drafters import rasd as rasd_module
from leaplm.speculative.drafters.rasd import fuse, prune
from leaplm.speculative.tree import check_tree

from .cases import greedy_equals_vanilla_on_ragged_batch, sampled_runs_are_reproducible


def _paths(tokens, parents):
    """Each node's token path from the root."""
    out = []
    for t, p in zip(tokens, parents):
        out.append((out[p] if p >= 0 else ()) + (t,))
    return out


def _tree(draft):
    parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
    check_tree(draft.tokens, parents)
    return _paths(draft.tokens, parents)


def _prefixes(paths):
    return {tuple(p[:i]) for p in paths for i in range(1, len(p) + 1)}


# ---------------------------------------------------------------------- fusion
def test_fuse_merges_shared_prefixes_in_priority_order():
    chain = [5, 6, 7]
    alternatives = [(0.2, 0, 9), (0.1, 1, 8)]              # 9 beside 5, 8 beside 6 (under 5)
    weighted = [([5, 6, 1, 2], 3), ([5, 4], 1), ([3, 3], 2)]
    draft = fuse(chain, alternatives, weighted, 16)
    assert draft.probs is None
    # the chain, then retrieval by weight (5-6-1-2: 3, 3-3: 2, 5-4: 1), then alternatives by probability
    assert _tree(draft) == [(5,), (5, 6), (5, 6, 7), (5, 6, 1), (5, 6, 1, 2), (3,), (3, 3), (5, 4), (9,), (5, 8)]
    assert draft.parents == [-1, 0, 1, 1, 3, -1, 5, 0, -1, 0]
    assert fuse(chain, alternatives, weighted, 5).tokens == [5, 6, 7, 1, 2]
    two = fuse(chain, alternatives, weighted, 2)
    assert two.tokens == [5, 6] and not two.is_tree                      # one path: a plain chain
    assert fuse([], [], [([4, 4], 1)], 4).tokens == [4, 4]                 # retrieval alone
    assert fuse([1, 2], [], [], 4).tokens == [1, 2]                       # the draft alone
    assert fuse([], [], [], 4).tokens == [] and fuse([1], [], [], 0).tokens == []


@pytest.mark.parametrize("seed", range(25))
def test_fuse_random_trees_respect_the_contract_budget_and_priority(seed):
    rng = random.Random(seed)
    chain = [rng.randrange(4) for _ in range(rng.randrange(0, 5))]
    alternatives = []
    for depth, token in enumerate(chain):
        for t in rng.sample([t for t in range(4) if t != token], rng.randrange(0, 3)):
            alternatives.append((rng.random(), depth, t))
    alternatives.sort(reverse=True)
    weighted = [([rng.randrange(4) for _ in range(rng.randrange(1, 6))], rng.choice([1, 1, 2, 7]))
                for _ in range(rng.randrange(0, 8))]
    k = rng.randrange(1, 20)
    draft = fuse(chain, alternatives, weighted, k)
    paths = _tree(draft)                       # topological order, siblings distinct (check_tree)
    alt_paths = [tuple(chain[:d]) + (t,) for _, d, t in alternatives]
    chain_prefixes = _prefixes([chain])
    retrieved = _prefixes(c for c, _ in weighted)
    every = chain_prefixes | set(alt_paths) | retrieved
    assert len(paths) == len(set(paths)) == min(k, len(every))   # shared prefixes are one node; the budget holds
    assert set(paths) <= every
    if k >= len(every):
        assert set(paths) == every                                # every divergent branch is kept
    n = min(k, len(chain))
    assert paths[:n] == [tuple(chain[:i + 1]) for i in range(n)]  # the draft chain first
    rest = paths[n:]
    retrieval_only = [p for p in rest if p in retrieved]
    alt_only = [p for p in rest if p not in retrieved]
    assert all(p in set(alt_paths) for p in alt_only)
    if alt_only:                                                  # alternatives only after every retrieval node
        assert retrieved - chain_prefixes <= set(rest)
        assert rest.index(alt_only[0]) == len(retrieval_only)

    def weight(path):
        return sum(w for c, w in weighted if tuple(c[:len(path)]) == path)

    left = retrieved - chain_prefixes - set(paths)
    if retrieval_only and left:                                   # retrieval: the heaviest nodes
        assert min(map(weight, retrieval_only)) >= max(map(weight, left))


# ---------------------------------------------------------------------- pruning
def test_prune_keeps_branches_whose_first_token_the_draft_finds_likely():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.3, 0.13, 0.1])   # ranking: 1, 3, 4, 5, 0, 2
    weighted = [([3, 9], 2), ([0, 1], 5), ([1], 1), ([4, 4, 4], 1), ([2, 2], 3), ([5], 1)]
    assert prune(weighted, probs, 2) == [([3, 9], 2), ([1], 1)]
    assert prune(weighted, probs, 3) == [([3, 9], 2), ([1], 1), ([4, 4, 4], 1)]
    assert prune(weighted, probs, 0, min_prob=0.1) == [([3, 9], 2), ([1], 1), ([4, 4, 4], 1), ([5], 1)]
    assert prune(weighted, probs, 3, min_prob=0.2) == [([3, 9], 2), ([1], 1)]
    assert prune(weighted, probs, 0) == weighted                  # pruning off
    assert prune(weighted, None, 1) == weighted                   # no draft distribution: nothing to prune by
    assert prune([([7], 1)], probs, 2) == []                      # beyond the distribution's vocabulary


# ---------------------------------------------------------------------- knobs
def test_bad_knobs_are_refused():
    ok = [[1, 2, 3]]
    for knobs, match in [({"num_draft": 0}, "rasd num_draft"), ({"num_draft": True}, "rasd num_draft"),
                         ({"prune_top_k": -1}, "rasd prune_top_k"), ({"prune_min_prob": 1.0}, "rasd prune_min_prob"),
                         ({"prune_min_prob": "x"}, "rasd prune_min_prob"), ({"draft_length": 0}, "rasd draft_length"),
                         ({"tree_top_k": -1}, "rasd tree_top_k"), ({"confidence": 1.5}, "rasd: draft_model confidence"),
                         ({"depth": 0}, "rasd: retrieval depth"),
                         ({"min_match": 3, "max_match": 2}, "rasd: .*min_match"),
                         ({"quantization": "int2"}, "rasd: .*quantization")]:
        with pytest.raises(InvalidParamsError, match=match):
            RASD("x", ok, **knobs)
    with pytest.raises(InvalidParamsError, match="rasd needs a corpus"):
        RASD("x", None)
    with pytest.raises(InvalidParamsError, match="rasd needs a draft model"):
        RASD(None, ok)
    with pytest.raises(InvalidParamsError, match="rasd: retrieval corpus"):
        RASD("x", [])
    with pytest.raises(InvalidParamsError, match=r"rasd needs a draft model and a corpus \(model and corpus missing\)"):
        make_drafter("rasd")
    with pytest.raises(InvalidParamsError, match=r"\(corpus missing\).*--draft-model and --corpus"):
        make_drafter({"method": "rasd", "model": "x"})
    with pytest.raises(InvalidParamsError, match=r"\(model missing\)"):
        make_drafter({"method": "rasd", "corpus": ok})
    with pytest.raises(InvalidParamsError, match="bad options for rasd"):
        make_drafter({"method": "rasd", "model": "x", "corpus": ok, "lookup": True})
    d = make_drafter({"method": "rasd", "model": "x", "corpus": ok, "num_draft": 9, "prune_top_k": 3})
    assert isinstance(d, RASD) and d.num_draft == 9 and d.prune_top_k == 3 and d.draft.chain_draft == 6


def test_a_draft_with_another_tokenizer_is_refused(tiny_model_dir, monkeypatch):
    target = build_model(tiny_model_dir("llama-gqa-untied")[0])
    d = RASD(build_model(tiny_model_dir("llama-gqa-untied")[0]), [[1, 2, 3]])
    bind = d.draft.bind

    def bridged(*a):
        bind(*a)
        d.draft.bridge = object()        # what DraftModel.bind sets for a draft with another tokenizer

    monkeypatch.setattr(d.draft, "bind", bridged)
    with pytest.raises(InvalidParamsError, match="rasd needs a draft model with the target's tokenizer"):
        d.bind(target)


# ---------------------------------------------------------------------- proposals
def test_propose_prunes_retrieval_by_the_drafts_top_k_at_the_root(tiny_model_dir):
    folder = tiny_model_dir("llama-gqa-untied")[0]
    target = build_model(folder)
    context = [7, 8, 9, 10, 11]
    corpus = [[10, 11, t, (t * 7) % 128] for t in range(3, 128)]   # every token follows (10, 11) once
    knobs = dict(num_draft=300, draft_length=2, adaptive=False, confidence=0.0, tree_top_k=0, include_context=False,
                 quantization=None, depth=2, max_occurrences=200)
    probe = RASD(build_model(folder), corpus, **knobs)
    probe.bind(target)
    root = probe.draft.tree_candidates(0, context, 8).root_probs
    top4 = set(root.topk(4).indices.tolist())
    for prune_top_k, allowed in [(4, top4), (0, set(range(3, 128)))]:
        d = RASD(build_model(folder), corpus, prune_top_k=prune_top_k, **knobs)
        d.bind(target)
        draft = d.propose(0, context, 300)
        assert draft.probs is None and draft.is_tree
        paths = _tree(draft)
        chain = d.draft._rows[0].last_draft
        assert paths[:2] == [tuple(chain[:1]), tuple(chain[:2])]
        firsts = {p[0] for p in paths}
        assert firsts == allowed | {chain[0]}
        retrieved = {p for p in paths if p[0] in allowed and len(p) == 2 and p != tuple(chain)}
        assert all(p[1] == (p[0] * 7) % 128 for p in retrieved)   # the continuation goes on below its first token
        assert d.stats["pruned"] == (125 - len(top4 & set(range(3, 128))) if prune_top_k else 0)


# ---------------------------------------------------------------------- in the engine
def _ragged_corpus(folder, rows=(0, 1)):
    """Prompt + vanilla greedy output of some rows of ``cases.greedy_equals_vanilla_on_ragged_batch``
    (its prompts: a repeated random 6-gram), and a decoy with a wrong ending for each."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, 128, (6,), generator=gen).tolist()
    prompts = [base * 4, torch.randint(3, 128, (9,), generator=gen).tolist() + base * 2, base[:3] * 5]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 17, 25)]
    out = Engine(build_model(folder), eos_token_ids=[2]).start(prompts, params).run()
    docs = [prompts[r] + out[r].output_ids for r in rows]
    return prompts, docs + [doc[:-6] + [(t + 1) % 128 for t in doc[-6:]] for doc in docs]


class _Recorder:
    """Records every proposal with the draft model's chain and alternatives and the kept retrieval
    continuations, and checks the draft cache holds the context each time."""

    def __init__(self, drafter, monkeypatch):
        self.steps = []
        self.kept = None
        drafter_propose, candidates = drafter.propose, drafter.draft.tree_candidates

        def tree_candidates(row, context, k):
            found = candidates(row, context, k)
            fed = drafter.draft._rows[row].fed
            assert fed[:len(context)] == list(context)            # synced to what the target accepted
            self.found = found
            return found

        def recording_prune(*a, **kw):
            self.kept = prune(*a, **kw)
            return self.kept

        def propose(row, context, k):
            self.found, self.kept = None, None
            draft = drafter_propose(row, context, k)
            self.steps.append((row, list(context), draft, self.found, self.kept))
            return draft

        monkeypatch.setattr(drafter.draft, "tree_candidates", tree_candidates)
        monkeypatch.setattr(rasd_module, "prune", recording_prune)
        monkeypatch.setattr(drafter, "propose", propose)

    def accepted_by_source(self, sequences):
        """Walk each proposed tree along what the row finally holds: accepted nodes per source."""
        counts = {"draft": 0, "retrieval": 0, "both": 0}
        for row, context, draft, found, kept in self.steps:
            if not draft.tokens:
                continue
            paths = _tree(draft)
            by_draft = _prefixes([found.chain] + [found.chain[:d] + [t] for _, d, t in found.alternatives])
            by_retrieval = _prefixes(c for c, _ in kept)
            # the engine's request ids are not batch rows: the row is the sequence this context starts
            sequence = next(s for s in sequences if s[: len(context)] == list(context))
            grown = tuple(sequence[len(context):])
            for p in paths:
                if grown[:len(p)] == p:
                    counts["both" if p in by_draft and p in by_retrieval else "draft" if p in by_draft
                           else "retrieval"] += 1
        return counts


def test_greedy_equals_vanilla_with_tokens_accepted_from_both_sources(tiny_model_dir, monkeypatch):
    """The target's own weights draft (so every chain token must be accepted: the draft cache follows the
    context even after a retrieval branch won); the corpus holds vanilla's text of rows 0 and 1 (so
    retrieval reaches past the chain there), row 2 gets no datastore help."""
    folder = tiny_model_dir("llama-gqa-untied")[0]
    prompts, corpus = _ragged_corpus(folder)
    target = build_model(folder)
    drafter = RASD(build_model(folder), corpus, num_draft=10, draft_length=2, adaptive=False, confidence=0.0,
                   quantization=None, depth=6, prune_top_k=4)
    drafter.bind(target)
    recorder = _Recorder(drafter, monkeypatch)
    vanilla, spec = greedy_equals_vanilla_on_ragged_batch(folder, drafter)
    sequences = [p + r.output_ids for p, r in zip(prompts, spec)]
    counts = recorder.accepted_by_source(sequences)
    assert counts["draft"] > 0 and counts["retrieval"] > 0 and counts["both"] > 0, counts
    assert sum(counts.values()) == sum(r.accepted for r in spec)
    for kind, n in counts.items():   # the drafter's own counters miss only each row's last step
        assert 0 < drafter.stats[f"accepted_{kind}"] <= n
    for row, context, draft, found, _ in recorder.steps:   # the chain is the target's own greedy continuation
        following = next(s for s in sequences if s[: len(context)] == list(context))[len(context):]
        n = min(len(found.chain), len(following))
        assert found.chain[:n] == following[:n]
    assert sum(r.target_passes for r in spec) < sum(r.target_passes for r in vanilla)


@pytest.mark.parametrize("prune_top_k", [0, 32])
def test_greedy_equals_vanilla_with_another_draft_model(tiny_model_dir, prune_top_k, monkeypatch):
    """A different (random, int8) draft: its chain and alternatives are mostly wrong, retrieval from a corpus
    built from the prompts fires, pruning by its top-32 (of 128) drops much of it; the output stays vanilla's."""
    folder = tiny_model_dir("llama-gqa-untied")[0]
    prompts, corpus = _ragged_corpus(folder, rows=(0,))
    corpus += [p[:] for p in prompts]
    target = build_model(folder)
    draft_model = build_model(tiny_model_dir("qwen3-qknorm")[0], quantization="int8")
    drafter = RASD(draft_model, corpus, num_draft=8, draft_length=3, confidence=0.0, depth=5,
                   prune_top_k=prune_top_k, tree_top_k=2, tree_min_prob=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the random draft may have more parameters than the target
        drafter.bind(target)
    recorder = _Recorder(drafter, monkeypatch)   # checks the draft cache holds each context (chains get rejected)
    _, spec = greedy_equals_vanilla_on_ragged_batch(folder, drafter)
    assert sum(r.drafted for r in spec) > 0 and any(draft.is_tree for _, _, draft, _, _ in recorder.steps)
    assert sum(r.accepted for r in spec) > 0
    assert drafter.stats["kept"] > 0 and drafter.stats["proposed_draft"] > 0
    assert (drafter.stats["pruned"] > 0) == bool(prune_top_k)


def test_sampled_runs_are_reproducible_with_deterministic_trees(tiny_model_dir):
    folder = tiny_model_dir("llama-gqa-untied")[0]
    target = build_model(folder)
    drafts = []

    def make():
        d = RASD(build_model(folder), [[4, 5, 6] * 6 + [9, 9, 4, 5, 6, 1]], num_draft=8, draft_length=3,
                 confidence=0.0, quantization=None, depth=4, prune_top_k=0, tree_min_prob=0.0)
        d.bind(target)
        propose = d.propose
        d.propose = lambda *a: drafts.append(x := propose(*a)) or x
        return d

    sampled_runs_are_reproducible(folder, make)
    assert drafts and all(d.probs is None for d in drafts)    # fixed candidates, even under sampling
    assert any(d.is_tree for d in drafts)
