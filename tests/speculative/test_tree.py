"""Token trees: structure helpers, the tree attention pattern (each node sees exactly its ancestors and
the committed context), compaction, and greedy exactness of tree drafts inside the engine."""
from __future__ import annotations

import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.quant import quantize_model
from leaplm.sampling import SamplingParams, TokenHistory, probabilities
from leaplm.speculative.drafters import Draft, Drafter
from leaplm.speculative.tree import ancestor_matrix, chain_parents, check_tree, children, compaction, depths, path_to
from leaplm.speculative.verify import target_argmax, target_probabilities

from .cases import greedy_equals_vanilla_on_ragged_batch, run

#        root
#       /    \
#      0      1
#     / \     |
#    2   3    4
#    |
#    5
PARENTS = [-1, -1, 0, 0, 1, 2]


def test_structure_helpers():
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    assert children(PARENTS) == [[0, 1], [2, 3], [4], [5], [], [], []]
    assert path_to(PARENTS, 5) == [0, 2, 5] and path_to(PARENTS, 4) == [1, 4]
    assert chain_parents(3) == [-1, 0, 1]
    check_tree([7, 8, 9, 10, 11, 12], PARENTS)
    with pytest.raises(ValueError, match="earlier node"):
        check_tree([1, 2], [-1, 1])
    with pytest.raises(ValueError, match="repeats token"):
        check_tree([5, 5], [-1, -1])


def test_ancestor_matrix_lets_each_node_see_exactly_its_ancestors():
    m = ancestor_matrix(PARENTS, width=9)
    for f in range(1, 7):
        expected = {0} | {1 + i for i in path_to(PARENTS, f - 1)}
        assert {g for g in range(9) if m[f, g]} == expected, f
    assert {g for g in range(9) if m[0, g]} == {0}
    assert {g for g in range(9) if m[8, g]} == {0, 8}        # padding: root and itself only
    assert torch.equal(ancestor_matrix(chain_parents(4)), torch.ones(5, 5, dtype=torch.bool).tril())


def test_compaction_moves_the_accepted_path_into_place():
    assert compaction([0, 2, 5]) == [(3, 2), (6, 3)]          # node 0 already sits at feed slot 1
    assert compaction([1, 4]) == [(2, 1), (5, 2)]
    assert compaction([0, 1, 2]) == []                        # a chain needs no move
    cache = KVCache(1, 1, 1, 1, 8)
    cache.k[0][0, 0, :, 0] = torch.arange(8.0)
    cache.move(0, [(2 + a, 2 + b) for a, b in compaction([1, 4])])
    assert cache.k[0][0, 0, :5, 0].tolist() == [0, 1, 2, 4, 7]   # root at slot 2, then feeds 2 and 5


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3),
    SamplingParams(temperature=1.3, top_k=5, frequency_penalty=2.0),
    SamplingParams(temperature=0, presence_penalty=2.0, repetition_penalty=1.5),
], ids=["all-penalties-top-p", "frequency-top-k", "greedy"])
def test_tree_penalties_count_each_node_s_root_to_node_path(params):
    """Row 1 + i of a tree's target distributions is the chain distribution after the path to node i:
    penalties count the output so far plus exactly that path - not the siblings or the other branches
    that come earlier in feed order. The history itself is left as it was."""
    vocab = 12
    tokens = [3, 4, 5, 6, 7, 8]    # on PARENTS: node 4's path is [1, 4], its feed-order prefix also holds 0, 2, 3
    logits = torch.randn(1 + len(tokens), vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits[:, 5] += 4      # token 5 (node 2) leads unless penalized: e.g. after node 3, whose feed prefix holds it
    history = TokenHistory(vocab, [1, 5], "cpu")
    history.add([3, 9, 9])
    before = history.counts.clone()
    probs = target_probabilities(logits, params, history, tokens, PARENTS)
    choices = target_argmax(logits, params, history, tokens, PARENTS)
    differs = 0
    for f in range(1 + len(tokens)):
        path = [tokens[i] for i in path_to(PARENTS, f - 1)] if f else []
        on_path, in_feed_order = TokenHistory(vocab, [1, 5], "cpu"), TokenHistory(vocab, [1, 5], "cpu")
        on_path.add([3, 9, 9] + path)
        in_feed_order.add([3, 9, 9] + tokens[: f])
        expected = probabilities(logits[f: f + 1], params, on_path)[0]
        assert torch.allclose(probs[f], expected, atol=1e-6), f
        assert choices[f] == int(expected.argmax()), f
        differs += not torch.allclose(expected, probabilities(logits[f: f + 1], params, in_feed_order)[0], atol=1e-6)
    assert differs > 0   # the case tells the path from the feed order apart
    assert torch.equal(history.counts, before)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "mistral-sliding", "gemma3", "qwen3-qknorm"])
@pytest.mark.parametrize("exact", [False, True])
def test_tree_pass_scores_every_node_like_the_chain_it_lies_on(name, exact, tiny_model_dir):
    """One tree pass over a ragged batch gives each node the logits of feeding its root-to-node path
    as a chain (sliding windows active: contexts longer than the window). With int8 weights and the
    batch-invariant attention (``exact``) they are bit-identical; in float, equal to rounding."""
    model = build_model(tiny_model_dir(name)[0])
    if exact:
        model = quantize_model(model, "int8")
        assert model.exact
    gen = torch.Generator().manual_seed(3)
    contexts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (13, 9)]
    trees = [(torch.randint(3, 128, (6,), generator=gen).tolist(), PARENTS),
             ([40, 41, 42], [-1, 0, -1])]
    width = 7
    cache = KVCache.for_model(model.config, 2, 32, torch.float32, "cpu")
    for b, ctx in enumerate(contexts):  # commit contexts[:-1]; the last token is the tree's root
        one = KVCache.for_model(model.config, 1, 32, torch.float32, "cpu")
        model(torch.tensor([ctx[:-1]]), torch.arange(len(ctx) - 1)[None], one)
        for layer in range(model.config.num_layers):
            cache.k[layer][b], cache.v[layer][b] = one.k[layer][0], one.v[layer][0]
        cache.commit(b, len(ctx) - 1)
    lengths = list(cache.lengths)
    feed = torch.zeros(2, width, dtype=torch.long)
    positions = torch.tensor(lengths)[:, None].repeat(1, width)
    mask = torch.zeros(2, width, width, dtype=torch.bool)
    for b, (tokens, parents) in enumerate(trees):
        feed[b, 0] = contexts[b][-1]
        feed[b, 1: 1 + len(tokens)] = torch.tensor(tokens)
        positions[b, 1: 1 + len(tokens)] += torch.tensor(depths(parents))
        mask[b] = ancestor_matrix(parents, width)
    logits = model(feed, positions, cache, kv_len=max(lengths) + width, tree=(lengths, mask))
    for b, (tokens, parents) in enumerate(trees):
        for f in range(1 + len(tokens)):
            path = [contexts[b][-1]] + ([tokens[i] for i in path_to(parents, f - 1)] if f else [])
            chain = KVCache.for_model(model.config, 1, 32, torch.float32, "cpu")
            for layer in range(model.config.num_layers):
                chain.k[layer][0], chain.v[layer][0] = cache.k[layer][b], cache.v[layer][b]
            n = lengths[b]
            ref = model(torch.tensor([path]), torch.arange(n, n + len(path))[None], chain,
                        contiguous_start=n)[0, -1]
            if exact:
                assert torch.equal(logits[b, f], ref), (b, f)
            else:
                assert (logits[b, f] - ref).abs().max() < 1e-4, (b, f)


class LookupTree(Drafter):
    """Test drafter: a tree of every earlier continuation of the last token (one branch per distinct
    next token), plus a wrong sibling at the root; each branch continued as a chain from its occurrence."""

    name = "lookup_tree"

    def __init__(self, num_draft: int = 10, branch_len: int = 3) -> None:
        self.num_draft, self.branch_len = num_draft, branch_len

    def propose(self, row, context, k):
        tokens, parents = [1], [-1]           # token 1 never appears in the test prompts: a decoy
        firsts: set[int] = {1}
        for end in range(len(context) - 1, 0, -1):
            if context[end - 1] != context[-1] or context[end] in firsts:
                continue
            firsts.add(context[end])
            parent = -1
            for token in context[end: end + self.branch_len]:
                if len(tokens) >= k:
                    break
                tokens.append(token)
                parents.append(parent)
                parent = len(tokens) - 1
        return Draft(tokens[:k], parents=parents[:k])


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3", "mistral-sliding"])
def test_greedy_tree_drafts_equal_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], LookupTree())
    assert sum(r.accepted for r in spec) > 0      # branches other than the decoy were accepted


def test_int8_tree_drafts_equal_int8_vanilla(tiny_model_dir):
    folder = tiny_model_dir("qwen2-bias")[0]
    model = quantize_model(build_model(folder), "int8")
    engine = Engine(model, eos_token_ids=[2])
    gen = torch.Generator().manual_seed(9)
    base = torch.randint(3, 128, (5,), generator=gen).tolist()
    prompts = [base * 4, base[:2] * 3 + base * 2]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (28, 19)]
    vanilla = run(engine, prompts, params)
    spec = run(engine, prompts, params, LookupTree())
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]


def test_sampled_tree_drafts_keep_penalties_and_seeds_deterministic(tiny_model_dir):
    """Sampling with penalties through trees runs, is reproducible, and respects max_tokens."""
    engine = Engine(build_model(tiny_model_dir("llama-gqa-untied")[0]), eos_token_ids=[2])
    prompt = [5, 6, 7, 8] * 5
    params = [SamplingParams(temperature=0.8, top_k=20, frequency_penalty=0.5, seed=3, max_tokens=20)]
    a = run(engine, [prompt], params, LookupTree())
    b = run(engine, [prompt], params, LookupTree())
    assert a[0].output_ids == b[0].output_ids and len(a[0].output_ids) == 20


class ChainAsTree(Drafter):
    """Test drafter: the prompt-lookup copy, written as a tree whose every node has one child."""

    name = "chain_as_tree"
    num_draft = 6

    def propose(self, row, context, k):
        for end in range(len(context) - 2, 0, -1):
            if context[end - 1] == context[-1]:
                tokens = list(context[end: end + k])
                return Draft(tokens, parents=chain_parents(len(tokens)))
        return Draft([])


def test_a_chain_shaped_tree_takes_the_chain_pass(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama-gqa-untied")[0]
    engine = Engine(build_model(folder), eos_token_ids=[2])
    widths, forward = [], engine.model.forward_paged

    def spy(tokens, positions, pool, step, *args, **kwargs):   # (width of the pass, whether any segment is a tree)
        widths.append((len(tokens), any(seg.parents is not None for seg in step.segments)))
        return forward(tokens, positions, pool, step, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward_paged", spy)
    prompts = [[5, 6, 7, 8, 9] * 4]
    params = [SamplingParams(temperature=0, max_tokens=20)]
    vanilla = run(engine, prompts, params)
    spec = run(engine, prompts, params, ChainAsTree())
    assert spec[0].output_ids == vanilla[0].output_ids
    assert any(w > 1 for w, _ in widths) and not any(tree for _, tree in widths)
