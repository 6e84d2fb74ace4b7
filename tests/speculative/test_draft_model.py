"""Draft-model speculation: greedy output identical to vanilla, sampling distribution identical to
vanilla (chi-square), the draft cache stays in sync, bad configurations refused."""
from __future__ import annotations

import warnings

import pytest
import torch

from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.cache.kv import KVCache
from leaplm.speculative.drafters import DraftModel, make_drafter
from leaplm.speculative.tree import check_tree, path_to


from .cases import run as _run
from .chi_square import ALPHA, consecutive_pairs_p
from .test_distribution import EOS, exact_joint, greedy_prompt, sample_joint, tiny_vocab_model


def _bound(draft_model, target, **knobs):
    d = DraftModel(draft_model, **knobs)
    d.bind(target)
    return d


@pytest.mark.parametrize("target_name,draft_name", [("llama-mha-tied", "llama-gqa-untied"), ("gemma3", "gemma3"),
                                                    ("qwen2-bias", "qwen3-qknorm")])
@pytest.mark.parametrize("tree", [{}, {"staged": False}, {"staged": "prompt_lookup"},
                                  {"tree_top_k": 3, "tree_extra": 5, "tree_min_prob": 0.0, "node_cost": 0.0},
                                  {"tree_top_k": 3, "tree_extra": 5, "tree_min_prob": 0.0, "node_cost": 0.0,
                                   "staged": False},
                                  {"tree_top_k": 2, "tree_extra": 5, "tree_min_prob": 0.0, "tree_width": 3}],
                         ids=["chain", "chain-unstaged", "chain-staged-lookup", "tree", "tree-unstaged",
                              "dynamic-tree"])
def test_greedy_draft_model_equals_vanilla_on_ragged_batches(target_name, draft_name, tree, tiny_model_dir):
    target = build_model(tiny_model_dir(target_name)[0])
    draft = build_model(tiny_model_dir(draft_name)[0], quantization="int8")
    engine = Engine(target, eos_token_ids=[2])
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 12, 25)]
    vanilla = _run(engine, prompts, params)
    drafter = _bound(draft, target, num_draft=4, confidence=0.0, **tree)
    assert drafter.num_draft == (9 if "tree_top_k" in tree else 4)   # a tree adds tree_extra nodes to the chain's 4
    spec = _run(engine, prompts, params, drafter)
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in vanilla]
    assert sum(r.drafted for r in spec) > 0


def test_the_target_drafting_for_itself_is_always_accepted(tiny_model_dir):
    """Same weights as draft: every draft token must be accepted — proves the draft cache follows
    what the target committed (a stale or misaligned cache would make drafts diverge)."""
    folder, _ = tiny_model_dir("llama-gqa-untied")
    target = build_model(folder)
    engine = Engine(target)
    prompts = [[5, 6, 7, 8, 9], [3, 4] * 6]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 2
    vanilla = _run(engine, prompts, params)
    spec = _run(engine, prompts, params, _bound(build_model(folder), target, num_draft=5, adaptive=False,
                                                 confidence=0.0, quantization=None))
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    for r in spec:
        assert r.accepted == r.drafted > 0
        assert r.target_passes <= 1 + -(-40 // 6)   # prefill + ceil(40 / (5 + 1)) decode passes


def test_a_compiled_target_compiles_its_draft_and_stays_exact(tiny_model_dir):
    """The same weights drafting for a compiled int8 target: the draft is compiled too, its compiled
    single-token steps agree with the target's (every draft accepted), and the output is the compiled
    target's greedy output."""
    folder, _ = tiny_model_dir("llama-gqa-untied")
    target = build_model(folder, quantization="int8")
    target.compile()
    engine = Engine(target)
    prompts, params = [[5, 6, 7, 8, 9]], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    vanilla = _run(engine, prompts, params)
    drafter = _bound(build_model(folder, quantization="int8"), target, num_draft=4, adaptive=False, confidence=0.0)
    assert drafter.model.compiled is not None and drafter.model.compiled.compile_s > 0
    spec = _run(engine, prompts, params, drafter)
    assert spec[0].output_ids == vanilla[0].output_ids
    assert spec[0].accepted == spec[0].drafted > 0


def test_adaptive_length_and_confidence_stop_shorten_drafts(tiny_model_dir):
    target = build_model(tiny_model_dir("llama-mha-tied")[0])
    draft = build_model(tiny_model_dir("llama-gqa-untied")[0])
    engine = Engine(target)
    prompt, params = [[5, 6, 7, 8, 9]], [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    fixed = _run(engine, prompt, params, _bound(draft, target, num_draft=6, adaptive=False, confidence=0.0))[0]
    adaptive = _run(engine, prompt, params, _bound(draft, target, num_draft=6, confidence=0.0))[0]
    confident = _run(engine, prompt, params, _bound(draft, target, num_draft=6, adaptive=False, confidence=0.9))[0]
    assert fixed.output_ids == adaptive.output_ids == confident.output_ids
    # an unrelated random draft is mostly rejected: both rules must draft less than fixed k
    assert adaptive.drafted < fixed.drafted and confident.drafted < fixed.drafted


# ---------------------------------------------------------------- sampling: distribution test
@pytest.fixture(scope="module")
def sampling_models(tmp_path_factory):
    """(target, draft, prompt): tiny random models over 16 tokens (test_distribution's), the draft a different
    one-layer model, and a prompt of the target's own greedy continuation."""
    folder = tmp_path_factory.mktemp("sampled_drafts")
    target = tiny_vocab_model(folder, "target")
    return target, tiny_vocab_model(folder, "draft", layers=1), greedy_prompt(target, [3, 4], 16)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9, ignore_eos=True),
                                    SamplingParams(temperature=1.3, top_k=5, min_p=0.05, ignore_eos=True)],
                         ids=["T0.7-top_p", "T1.3-top_k-min_p"])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
def test_sampled_drafts_keep_the_target_distribution(params, staged, sampling_models):
    """Two-token drafts *sampled* by a different model from its warped distribution q (temperature, top-p /
    top-k / min-p, as the request asks), verified against the target: tokens 2 and 3 are drafted, 4 may be
    the bonus, and each consecutive pair of the 4 tokens of 2048 seeded rows is distributed as vanilla
    sampling's (chi-square). Verification must get the very q the drafts were drawn from: handing it the
    draft's raw softmax instead (temperature 1, no cuts) fails every case, a q warped at temperature 1 the
    temperature-0.7 ones (p-values below 1e-6 when this was written)."""
    target, draft, prompt = sampling_models
    drafter = _bound(draft, target, num_draft=2, adaptive=False, confidence=0.0, quantization=None, staged=staged)
    counts, drafted, accepted = sample_joint(Engine(target, eos_token_ids=[EOS]), prompt, params, 4, 2048, drafter)
    assert drafted >= 2048 and 0.05 * drafted < accepted < 0.95 * drafted, (drafted, accepted)   # tested for real
    pvalues = consecutive_pairs_p(counts, exact_joint(target, prompt, params, 4))
    assert min(pvalues) > ALPHA / len(pvalues), f"p-values of the consecutive pairs {pvalues}"


# ---------------------------------------------------------------- configuration errors
def test_bad_configurations_are_refused(tiny_model_dir):
    with pytest.raises(InvalidParamsError, match="num_draft"):
        DraftModel("x", num_draft=0)
    with pytest.raises(InvalidParamsError, match="confidence"):
        DraftModel("x", confidence=1.5)
    with pytest.raises(InvalidParamsError, match="needs a draft model"):
        make_drafter("draft_model")
    with pytest.raises(InvalidParamsError, match="unknown quantization"):
        make_drafter({"method": "draft", "model": "x", "quantization": "int2"})
    from transformers import LlamaConfig, LlamaForCausalLM

    target = build_model(tiny_model_dir("llama-gqa-untied")[0])
    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    folder = tiny_model_dir("llama-gqa-untied")[0].parent / "vocab64"
    small.save_pretrained(folder, safe_serialization=True)
    with pytest.raises(InvalidParamsError, match="vocabulary"):
        DraftModel(build_model(folder)).bind(target)
    with pytest.raises(InvalidParamsError, match="bind"):
        DraftModel("x").start(0, SamplingParams())


def test_a_draft_larger_than_the_target_is_warned(tiny_model_dir):
    small = build_model(tiny_model_dir("llama-gqa-untied")[0])   # 2 kv heads: fewer parameters
    big = build_model(tiny_model_dir("llama-mha-tied")[0])
    with pytest.warns(UserWarning, match="larger than the target"):
        DraftModel(big).bind(small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DraftModel(small).bind(big)


def test_lookup_first_then_model_is_exact(tiny_model_dir):
    target = build_model(tiny_model_dir("llama-mha-tied")[0])
    draft = build_model(tiny_model_dir("llama-gqa-untied")[0])
    engine = Engine(target)
    prompts = [[5, 6, 7, 8, 9, 10] * 4, [11, 12, 13]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 2
    vanilla = _run(engine, prompts, params)
    spec = _run(engine, prompts, params, _bound(draft, target, num_draft=5, lookup=True))
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    # a repeated 2-gram is copied without running the model; otherwise the model drafts
    d = _bound(draft, target, num_draft=4, lookup=True, confidence=0.0, adaptive=False)
    d.start(0, SamplingParams(temperature=0))
    assert d.propose(0, [20, 21, 22, 23, 24, 20, 21], 4).tokens == [22, 23, 24, 20]
    assert d._rows[0].fed == []          # the model was not run
    assert len(d.propose(0, [30, 31, 32], 4).tokens) == 4
    assert d._rows[0].fed[:3] == [30, 31, 32]


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_shrunk_draft_vocabulary_only_proposes_kept_tokens_and_stays_exact(quantization, tiny_model_dir):
    target = build_model(tiny_model_dir("llama-mha-tied")[0])
    engine = Engine(target)
    prompts = [[5, 6, 7, 8, 9], [70, 90, 100, 3]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 2
    vanilla = _run(engine, prompts, params)
    drafter = _bound(build_model(tiny_model_dir("llama-gqa-untied")[0], quantization=quantization), target,
                     num_draft=4, confidence=0.0, draft_vocab=64)
    proposed = []
    propose = drafter.propose
    drafter.propose = lambda *a: proposed.extend((d := propose(*a)).tokens) or d
    spec = _run(engine, prompts, params, drafter)
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert proposed and all(t < 64 for t in proposed)
    assert any(t >= 64 for r in vanilla for t in r.output_ids)   # the target still says anything
    with pytest.raises(InvalidParamsError, match="draft_vocab"):
        DraftModel("x", draft_vocab=0)


# ---------------------------------------------------------------- tree mode
def test_tree_mode_drafts_the_chain_plus_alternative_leaves(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    target = build_model(folder)
    drafter = _bound(build_model(folder), target, num_draft=3, adaptive=False, confidence=0.0,
                     quantization=None, tree_top_k=2, tree_extra=4, tree_min_prob=0.0, node_cost=0.0)
    drafter.start(0, SamplingParams(temperature=0))
    draft = drafter.propose(0, [5, 6, 7, 8], 7)
    assert draft.is_tree and len(draft.tokens) == 7      # 3 chain tokens + the 4 likeliest alternatives
    spine = [0]
    while len(spine) < 3:
        spine.append(next(i for i, p in enumerate(draft.parents) if p == spine[-1] and i > spine[-1]))
    assert all(draft.parents[i] in [-1] + spine for i in range(len(draft.tokens)))   # alternatives are leaves
    # the same weights drafting: every chain token is what the target picks greedily
    engine = Engine(target)
    prompt, params = [[5, 6, 7, 8]], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    rows = _run(engine, prompt, params, drafter)
    assert rows[0].output_ids == _run(engine, prompt, params)[0].output_ids
    assert rows[0].accepted >= 3 * (rows[0].target_passes - 2)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-int8"])
def test_dynamic_tree_expands_the_likeliest_nodes_of_each_depth(compiled, tiny_model_dir):
    """tree_width = 3: nodes off the greedy chain get children too, and every node's token is among the
    draft's likeliest after its own path — computed here by feeding the path as a plain sequence, so the
    draft's subtree passes (tree attention over the draft cache) are checked against chain decoding."""
    folder, _ = tiny_model_dir("llama-gqa-untied")
    quant = "int8" if compiled else None
    target, draft_model = build_model(folder, quantization=quant), build_model(folder, quantization=quant)
    if compiled:
        target.compile()
    drafter = _bound(draft_model, target, num_draft=4, adaptive=False, confidence=0.0, quantization=quant,
                     tree_top_k=2, tree_extra=8, tree_min_prob=0.0, tree_width=3)
    assert (drafter.model.compiled is not None) == compiled
    drafter.start(0, SamplingParams(temperature=0))
    context = [5, 6, 7, 8, 9, 10]
    draft = drafter.propose(0, context, 12)
    assert draft.is_tree and len(draft.tokens) == 12
    check_tree(draft.tokens, draft.parents)
    chain = [0]
    while (nxt := next((i for i, p in enumerate(draft.parents) if p == chain[-1]), None)) is not None:
        chain.append(nxt)
    assert any(p >= 0 and p not in chain for p in draft.parents)   # a branch off the chain was expanded
    for i, token in enumerate(draft.tokens):
        path = [draft.tokens[j] for j in path_to(draft.parents, i)]
        ids = torch.tensor([context + path[:-1]])
        logits = build_model(folder, quantization=quant)(ids, torch.arange(ids.shape[1])[None],
                                                          KVCache.for_model(draft_model.config, 1, 32, torch.float32,
                                                                            "cpu"), kv_len=ids.shape[1],
                                                          contiguous_start=0)[0, -1]
        assert token in logits.topk(3).indices.tolist()   # among the top tree_top_k + 1
    # drafting for itself: exact, and each pass accepts at least the chain's depth
    engine = Engine(target)
    prompt, params = [context], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    rows = _run(engine, prompt, params, drafter)
    assert rows[0].output_ids == _run(engine, prompt, params)[0].output_ids
    assert rows[0].accepted > 0


def test_leaves_are_cut_to_what_pays_for_the_wider_pass(tiny_model_dir):
    """Tree mode keeps the number of alternative leaves that maximises expected tokens per unit of pass
    time: all of them when nodes are free, none when a node costs a whole pass, the target's measured
    table by default."""
    from leaplm.speculative.cost import PassCost

    folder, _ = tiny_model_dir("llama-gqa-untied")
    target = build_model(folder)
    sizes = {}
    for cost in (0.0, 0.05, 10.0):
        drafter = _bound(build_model(folder), target, num_draft=3, adaptive=False, confidence=0.0, quantization=None,
                         tree_top_k=2, tree_extra=4, tree_min_prob=0.0, node_cost=cost)
        drafter.start(0, SamplingParams(temperature=0))
        sizes[cost] = len(drafter.propose(0, [5, 6, 7, 8], 7).tokens)
    assert sizes[0.0] == 7 and sizes[10.0] == 3 and 3 <= sizes[0.05] <= 7
    # leaves the target never took (their probabilities promised 1000 taken) are discounted until none pays
    drafter = _bound(build_model(folder), target, num_draft=3, adaptive=False, confidence=0.0, quantization=None,
                     tree_top_k=2, tree_extra=4, tree_min_prob=0.0, node_cost=0.001)
    drafter.start(0, SamplingParams(temperature=0))
    assert len(drafter.propose(0, [5, 6, 7, 8], 7).tokens) > 3
    drafter._leaf_expected = 1000.0
    assert len(drafter.propose(0, [5, 6, 7, 8], 7).tokens) == 3
    measured = _bound(build_model(folder), target, num_draft=3, tree_top_k=2, tree_extra=4, quantization=None)
    assert isinstance(measured._pass_cost, PassCost) and len(measured._pass_cost.at(100)) == 8
    assert measured._pass_cost.short != [1.0 + 0.05 * n for n in range(8)]     # timed, not the default line


def test_tree_knobs_are_refused():
    with pytest.raises(InvalidParamsError, match="node_cost"):
        DraftModel("x", tree_top_k=2, node_cost=-1)
    with pytest.raises(InvalidParamsError, match="tree_width"):
        DraftModel("x", tree_top_k=2, tree_width=0)
    with pytest.raises(InvalidParamsError, match="tree_width > 1"):
        DraftModel("x", tree_width=2)
    with pytest.raises(InvalidParamsError, match="tree_top_k"):
        DraftModel("x", tree_top_k=-1)
    with pytest.raises(InvalidParamsError, match="tree_min_prob"):
        DraftModel("x", tree_top_k=2, tree_min_prob=1.5)


# ---------------------------------------------------------------- staged drafting
def _count_passes(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-int8"])
def test_staged_drafting_drafts_the_same_chains_in_fewer_draft_passes(compiled, tiny_model_dir):
    """The inner drafter only saves draft passes: proposal for proposal the staged chains equal the
    one-token-per-pass chains (same draft weights), the output equals vanilla, and over a repetitive
    generation (a tiny random model loops, which Token Recycling learns) the staged draft runs fewer
    passes than it drafts tokens — where the unstaged one runs one per drafted token."""
    folder, _ = tiny_model_dir("llama-gqa-untied")
    target_folder, _ = tiny_model_dir("llama-mha-tied")
    quant = "int8" if compiled else None
    target = build_model(target_folder, quantization=quant)
    if compiled:
        target.compile()
    engine = Engine(target)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46]]
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * 2
    vanilla = _run(engine, prompts, params)
    runs = {}
    for staged in (False, True):
        model = build_model(folder, quantization=quant)
        # a fixed node cost: the cost the inner drafter measures at bind varies with the machine's load, and a
        # busy machine's measurement made it draft no tree at all (staged passes == plain passes)
        inner = {"method": "recycling", "node_cost": 0.0} if staged else False
        drafter = _bound(model, target, num_draft=6, adaptive=False, confidence=0.0, quantization=quant, staged=inner)
        passes = _count_passes(drafter.model)
        proposals = []
        propose = drafter.propose
        drafter.propose = lambda *a: proposals.append((d := propose(*a)).tokens) or d
        rows = _run(engine, prompts, params, drafter)
        assert [r.output_ids for r in rows] == [r.output_ids for r in vanilla]
        runs[staged] = (proposals, passes[0], sum(len(p) for p in proposals))
    (plain, plain_passes, drafted), (staged, staged_passes, _) = runs[False], runs[True]
    assert staged == plain
    assert plain_passes >= drafted - len(plain)          # one pass per drafted token but each chain's last
    assert staged_passes < 0.75 * plain_passes, (staged_passes, plain_passes)


def test_staged_knob_is_checked():
    assert DraftModel("x").inner is not None and DraftModel("x").inner.name == "recycling"   # the default
    assert DraftModel("x", staged=False).inner is None
    assert DraftModel("x", staged="pld").inner.name == "prompt_lookup"
    assert DraftModel("x", staged={"method": "recycling", "num_draft": 8}).inner.num_draft == 8
    for bad in ("aded", "copyspec", "telepathy", "draft_model"):
        with pytest.raises(InvalidParamsError, match="staged"):
            DraftModel("x", staged=bad)
