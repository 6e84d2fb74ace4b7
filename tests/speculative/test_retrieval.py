"""Retrieval drafting (REST): suffix array and datastore against brute force, the trie's top-k token
tree, corpora from files, refused knobs, and exact greedy output in the engine."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from leaplm.errors import InvalidParamsError
from leaplm.speculative.drafters import Draft, PromptLookup
from leaplm.speculative.drafters.retrieval import Datastore, Retrieval, _select, suffix_array

from .cases import greedy_equals_vanilla_on_ragged_batch


# ---------------------------------------------------------------------- suffix array / datastore
@pytest.mark.parametrize("alphabet", [1, 2, 3, 50])
def test_suffix_array_equals_brute_force(alphabet):
    rng = np.random.default_rng(alphabet)
    for _ in range(150):
        a = rng.integers(-2, alphabet - 2 if alphabet > 2 else 1, int(rng.integers(0, 60)))
        assert suffix_array(a).tolist() == sorted(range(len(a)), key=lambda i: a[i:].tolist())
    a = np.tile([5, 3, 5], 400)  # long repeats: many doubling rounds
    assert suffix_array(a).tolist() == sorted(range(len(a)), key=lambda i: a[i:].tolist())


def _brute_occurrences(docs, pattern):
    """(document, offset) of every occurrence of ``pattern`` inside one document."""
    m = len(pattern)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - m + 1) if list(doc[i:i + m]) == pattern]


def test_datastore_counts_and_finds_what_brute_force_does():
    rng = random.Random(0)
    docs = [[rng.randrange(4) for _ in range(rng.randrange(0, 30))] for _ in range(12)]
    ds = Datastore(docs, progress=False)
    assert ds.num_documents == 12 and len(ds) == sum(map(len, docs))
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])
    for _ in range(300):
        pattern = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        want = _brute_occurrences(docs, pattern)
        assert ds.count(pattern) == len(want)
        assert ds.occurrences(pattern).tolist() == [int(starts[d]) + i for d, i in want]


def test_lookup_takes_the_longest_matching_suffix_and_its_continuations():
    ds = Datastore([[1, 2, 3, 4, 5, 6], [9, 2, 3, 7, 8], [2, 3, 4, 5, 0]], progress=False)
    # (1, 2, 3) occurs once, so its continuation alone wins over the three of (2, 3)
    assert ds.lookup([0, 1, 2, 3], max_match=4, min_match=2, depth=3) == (3, [[4, 5, 6]])
    m, conts = ds.lookup([6, 2, 3], max_match=4, min_match=2, depth=2)
    assert m == 2 and sorted(conts) == [[4, 5], [4, 5], [7, 8]]
    assert ds.lookup([6, 6, 3], max_match=4, min_match=2) == (0, [])     # (6, 3) never seen
    assert ds.lookup([3], max_match=4, min_match=2) == (0, [])           # shorter than min_match
    assert Datastore([], progress=False).lookup([1, 2, 3]) == (0, [])


def test_no_match_and_no_continuation_spans_two_documents():
    ds = Datastore([[1, 2, 3], [4, 5, 6], [1, 2, 3, 4, 7]], progress=False)
    assert ds.count([3, 4]) == 1 and ds.count([3, 4, 5]) == 0 and ds.count([6, 1]) == 0
    assert ds.lookup([8, 5, 6], min_match=1) == (0, [])                 # (5, 6) and (6,) end their document
    assert sorted(ds.lookup([0, 1, 2], depth=5)[1]) == [[3], [3, 4, 7]]  # cut at the document's end
    # the longest match ends its document: a shorter one that has a continuation is used instead
    ds = Datastore([[7, 8, 9], [8, 9, 5]], progress=False)
    assert ds.lookup([7, 8, 9], min_match=1) == (2, [[5]])


def test_many_occurrences_are_sampled_in_proportion():
    docs = [[1, 2, 7, 7]] * 45 + [[1, 2, 8, 8]] * 15
    m, conts = Datastore(docs, progress=False).lookup([1, 2], max_occurrences=4, depth=1)
    assert m == 2 and sorted(conts) == [[7], [7], [7], [8]]


# ---------------------------------------------------------------------- the token tree
def _check_tree(draft: Draft, k: int) -> list[tuple[int, ...]]:
    """Contract checks; returns each node's path of tokens from the root."""
    parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
    assert len(draft.tokens) == len(parents) <= k
    paths, seen = [], set()
    for i, (t, p) in enumerate(zip(draft.tokens, parents)):
        assert -1 <= p < i                         # topological: a parent is picked before its children
        assert (p, t) not in seen                  # siblings distinct
        seen.add((p, t))
        paths.append((paths[p] if p >= 0 else ()) + (t,))
    return paths


@pytest.mark.parametrize("seed", range(20))
def test_the_tree_is_the_heaviest_connected_nodes_within_the_budget(seed):
    rng = random.Random(seed)
    weighted = [([rng.randrange(3) for _ in range(rng.randrange(1, 6))], rng.choice([1, 1, 1, 5]))
                for _ in range(rng.randrange(1, 12))]
    k = rng.randrange(1, 15)
    draft = _select(weighted, k, tree=True)
    paths = _check_tree(draft, k)

    def weight(path):
        return sum(w for c, w in weighted if tuple(c[:len(path)]) == path)

    every = {tuple(c[:i]) for c, _ in weighted for i in range(1, len(c) + 1)}
    picked = set(paths)
    assert len(draft.tokens) == min(k, len(every))
    left = every - picked
    if left:
        assert min(map(weight, picked)) >= max(map(weight, left))
    chain = _select(weighted, k, tree=False)
    assert not chain.is_tree and 1 <= len(chain.tokens) <= k
    for i in range(len(chain.tokens)):   # each step takes the heaviest child
        here = tuple(chain.tokens[:i])
        best = max(weight(p) for p in every if len(p) == i + 1 and p[:i] == here)
        assert weight(tuple(chain.tokens[:i + 1])) == best


def test_propose_builds_a_tree_from_the_datastore():
    d = Retrieval([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [1, 2, 7, 7], [8, 1, 2, 3, 4, 6]], num_draft=4, depth=4,
                  include_context=False)
    assert d.name == "retrieval"
    draft = d.propose(0, [0, 1, 2], 8)           # k above num_draft: num_draft bounds it
    assert draft.tokens[:2] == [3, 4] and draft.parents[:2] == [-1, 0] and len(draft.tokens) == 4
    _check_tree(draft, 4)
    assert d.propose(0, [0, 1, 2], 1) == Draft([3])
    assert d.propose(0, [0, 1, 2], 0) == Draft([])
    assert d.propose(0, [5, 5, 5], 4) == Draft([])   # nothing matches
    single = d.propose(1, [4, 8, 1], 4)              # one occurrence: a chain
    assert single == Draft([2, 3, 4, 6])


def test_the_own_context_outweighs_the_datastore_and_keeps_prompt_lookups_draft():
    rng = random.Random(3)
    corpus = [[rng.randrange(20) for _ in range(40)] for _ in range(30)]
    for seed in range(30):
        r = random.Random(seed)
        context = [r.randrange(8) for _ in range(r.randrange(4, 60))]
        d = Retrieval(corpus, num_draft=12, depth=6, max_match=3)
        draft = d.propose(0, context, 12)
        pld = PromptLookup(num_draft=6, max_ngram=3).propose(0, context, 6).tokens
        paths = set(_check_tree(draft, 12))
        # prompt lookup's draft (depth <= 6 tokens) is a root path of the tree
        assert not pld or tuple(pld) in paths


def test_a_loop_in_the_context_is_drafted_past_its_end():
    d = Retrieval([[50, 51, 52]], num_draft=6, depth=6)
    assert d.propose(0, [7, 1, 2, 1, 2, 1, 2], 6) == Draft([1, 2, 1, 2, 1, 2])
    # the row's index grows with the context; a different context on the row starts over
    assert d.propose(0, [7, 1, 2, 1, 2, 1, 2, 3, 1, 2], 3) == Draft([3, 1, 2])
    assert d.propose(0, [4, 50, 51], 3) == Draft([52])
    d.reset(0)
    assert d.propose(0, [9, 9, 9], 2) == Draft([9, 9])


# ---------------------------------------------------------------------- corpora and knobs
def test_bad_knobs_and_corpora_are_refused(tmp_path):
    ok = [[1, 2, 3]]
    for knobs, match in [({"num_draft": 0}, "num_draft"), ({"depth": 0}, "depth"),
                         ({"max_occurrences": True}, "max_occurrences"),
                         ({"min_match": 3, "max_match": 2}, "min_match"),
                         ({"min_match": 0}, "min_match"), ({"max_match": 2.5}, "max_match")]:
        with pytest.raises(InvalidParamsError, match=match):
            Retrieval(ok, **knobs)
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(InvalidParamsError, match="nowhere.txt.*does not exist"):
        Retrieval(str(missing))
    with pytest.raises(InvalidParamsError, match="nowhere.txt"):
        Retrieval([missing, tmp_path])
    (tmp_path / "data.bin").write_bytes(b"\0\1")
    with pytest.raises(InvalidParamsError, match="holds no text files"):
        Retrieval(tmp_path)
    for corpus, match in [([], "empty"), (None, "NoneType"), ([1, 2, 3], "flat list"),
                          ([[1, 2], str(tmp_path)], "not a mix"), ([[1, -2]], "outside"), ([[1.5, 2.0]], "token ids"),
                          ([[[1, 2]]], "token ids")]:
        with pytest.raises(InvalidParamsError, match=match):
            Retrieval(corpus)
    d = Retrieval([[1, 2, 300]])
    with pytest.raises(InvalidParamsError, match="token id 300, beyond the target's vocabulary"):
        d.bind(_FakeModel(128))
    d.bind(_FakeModel(301))


class _FakeModel:
    def __init__(self, vocab_size):
        self.config = type("Config", (), {"vocab_size": vocab_size})()


def _tokenizer():
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from leaplm.tokenizer import Tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
             "Retrieval drafts what followed the same words elsewhere."] * 10
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    return Tokenizer(hf, add_bos=True)   # encode() adds BOS; the corpus must not get it


def test_a_text_corpus_is_tokenized_with_the_targets_tokenizer(tmp_path):
    tok = _tokenizer()
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    fox = "The quick brown fox jumps over the lazy dog."
    (tmp_path / "notes.md").write_text(fox)
    (tmp_path / "src" / "deep" / "add.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"id": 3, "text": "Retrieval drafts what followed"}) + "\n\n"
                                         + json.dumps(["the same", "words elsewhere."]) + "\nnot json at all\n")
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    d = Retrieval(tmp_path, num_draft=8, depth=8, include_context=False)
    assert [f.name for f in d.files] == ["chat.jsonl", "notes.md", "add.py"]
    with pytest.raises(InvalidParamsError, match="needs the target's tokenizer"):
        d.bind(_FakeModel(300))
    with pytest.raises(InvalidParamsError, match="not indexed yet"):
        d.propose(0, [1, 2, 3], 4)
    d.bind(_FakeModel(len(tok.hf)), tok)
    ds = d.datastore
    assert ds.num_documents == 5     # 3 jsonl lines + 2 files
    assert tok.bos_token_id not in ds.tokens.tolist()
    ids = tok.encode(fox, add_special_tokens=False)
    assert ds.count(ids) == 1 and ds.count(tok.encode("the same\nwords elsewhere.", add_special_tokens=False)) == 1
    assert ds.count(tok.encode("not json at all", add_special_tokens=False)) == 1
    draft = d.propose(0, [tok.bos_token_id] + ids[:4], 8)
    assert draft.tokens == ids[4:12]
    d.bind(_FakeModel(len(tok.hf)), tok)   # same tokenizer again: nothing to redo
    assert d.datastore is ds
    single = Retrieval(tmp_path / "notes.md")
    single.bind(None, tok)
    assert single.datastore.num_documents == 1 and single.datastore.tokens[:-1].tolist() == ids


# ---------------------------------------------------------------------- in the engine
def _ragged_base():
    """The repeated 6-gram of ``cases.greedy_equals_vanilla_on_ragged_batch``."""
    gen = torch.Generator().manual_seed(5)
    return torch.randint(3, 128, (6,), generator=gen).tolist()


class _Recording(Retrieval):
    """Counts the tree-shaped drafts it hands the engine."""

    trees = 0

    def propose(self, row, context, k):
        draft = super().propose(row, context, k)
        self.trees += draft.is_tree
        return draft


def test_greedy_retrieval_equals_vanilla_on_ragged_batches(tiny_model_dir):
    base = _ragged_base()
    corpus = [base * 3 + [9, 10, 11], [4, 5] + base[2:] + base, list(range(3, 60)), base[:4] + [7, 8, 9]]
    drafter = _Recording(corpus=corpus, num_draft=8, depth=6)
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir("llama-gqa-untied")[0], drafter)
    assert sum(r.drafted for r in spec) > 0 and drafter.trees > 0


def _vanilla_corpus(folder):
    """Prompt + greedy output of each row of ``cases.greedy_equals_vanilla_on_ragged_batch``."""
    from leaplm.engine import Engine
    from leaplm.models.load import build_model
    from leaplm.sampling import SamplingParams

    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, 128, (6,), generator=gen).tolist()
    prompts = [base * 4, torch.randint(3, 128, (9,), generator=gen).tolist() + base * 2, base[:3] * 5]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 17, 25)]
    rows = Engine(build_model(folder), eos_token_ids=[2]).start(prompts, params).run()
    return [p + r.output_ids for p, r in zip(prompts, rows)]


@pytest.mark.parametrize("tree", [False, True])
def test_greedy_retrieval_from_the_datastore_alone_is_accepted(tiny_model_dir, tree):
    """The datastore holds what vanilla decoding writes (and a decoy): drafts from it alone are accepted."""
    folder = tiny_model_dir("llama-gqa-untied")[0]
    corpus = _vanilla_corpus(folder)
    corpus += [doc[:-8] + [(t + 1) % 128 for t in doc[-8:]] for doc in corpus]   # a wrong ending each
    drafter = _Recording(corpus, num_draft=12, depth=4, tree=tree, include_context=False)
    vanilla, spec = greedy_equals_vanilla_on_ragged_batch(folder, drafter)
    assert sum(r.accepted for r in spec) > 0
    assert sum(r.target_passes for r in spec) < sum(r.target_passes for r in vanilla)
    assert (drafter.trees > 0) == tree


def test_sampled_requests_run_with_tree_drafts(tiny_model_dir):
    """Smoke test: tree drafts under sampling (deterministic q) go through the engine's tree verifier."""
    from leaplm.engine import Engine
    from leaplm.models.load import build_model
    from leaplm.sampling import SamplingParams

    folder = tiny_model_dir("llama-gqa-untied")[0]
    rng = random.Random(1)
    corpus = [[rng.randrange(128) for _ in range(200)] for _ in range(20)]   # every token, ~30 continuations
    drafter = _Recording(corpus, num_draft=12, depth=4, min_match=1)
    prompts = [doc[:20] for doc in corpus[:3]]
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=20, ignore_eos=True) for s in range(3)]
    rows = Engine(build_model(folder)).start(prompts, params, drafter).run()
    assert all(len(r.output_ids) == 20 for r in rows) and drafter.trees > 0
