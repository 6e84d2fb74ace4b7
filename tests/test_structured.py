"""Structured output inside the engine: masks on the raw logits, EOS only where the grammar ends, finish
reasons, jump-forward, draft pruning (chains and trees), and greedy constrained output with speculation ==
without it, token for token — on a tiny random llama with a tiny BPE tokenizer (no checkpoint needed), on a
random-logits stub (property tests), and on the real SmolLM2 GGUF (``real``)."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from leaplm.constrain import allocate_bitmask, bitmask_width, compile_constraint, unpack_bitmask
from leaplm.engine import Engine, constrain_draft, feed_parents
from leaplm.errors import ConstraintError, InvalidConstraintError, InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import CopySpec, Draft, PromptLookup, TokenRecycling
from leaplm.speculative.tree import depths

from .structured_helpers import (EOS, SCHEMAS, VOCAB, OracleDrafter, RandomDrafter, RandomLogitsModel,
                                 build_tiny_llm, tiny_tokenizer)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tok, tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("structured-llama"), tok)


@pytest.fixture(scope="module")
def engine(tiny_dir, tok):
    return Engine(build_model(tiny_dir), eos_token_ids=[EOS], constrainer=constrainer(tok))


def constrainer(tok, vocab: int = VOCAB):
    return lambda p: compile_constraint(tok, **p.constraint, vocab_size=vocab).new()


def valid_output(tok, params: SamplingParams, out: list[int], finish: str) -> None:
    """Grammar-valid: a complete instance when the row stopped, a valid prefix when it hit max_tokens."""
    c = compile_constraint(tok, **params.constraint, vocab_size=VOCAB).new()
    assert c.validate(out) == len(out), (tok.decode(out), finish)
    ids = out[:-1] if out and out[-1] == EOS else out
    if finish == "stop":
        c.advance(ids)
        assert c.can_stop(), tok.decode(out)
        text = tok.decode(ids)
        if params.json_schema is not None:
            jsonschema.validate(json.loads(text), params.json_schema)
        elif params.json_object:
            assert isinstance(json.loads(text), dict)
        elif params.regex is not None:
            assert re.fullmatch(params.regex, text), text
    else:
        assert finish == "length" and len(out) == params.max_tokens


PROMPTS = [[5, 9, 33, 70, 12, 40, 41, 42] * 3, [100, 3, 44, 45, 46, 47], [7, 7, 8, 120, 64, 30, 2, 11, 12, 13] * 2]


# ---------------------------------------------------------------------- parameters and errors
def test_sampling_params_take_at_most_one_constraint():
    assert SamplingParams().constraint is None
    assert SamplingParams(json_schema={"type": "integer"}).constraint == {"json_schema": {"type": "integer"}}
    assert SamplingParams(json_schema=False).constraint == {"json_schema": False}
    assert SamplingParams(json_object=True).constraint == {"json_object": True}
    assert SamplingParams(regex="a+").constraint == {"regex": "a+"}
    assert SamplingParams(grammar='start: "a"').jump_forward is True
    with pytest.raises(InvalidParamsError, match=r"at most one of .* \(got regex, grammar\)"):
        SamplingParams(regex="a", grammar='start: "a"')
    with pytest.raises(InvalidParamsError, match=r"got json_schema, json_object"):
        SamplingParams(json_schema={}, json_object=True)
    with pytest.raises(InvalidParamsError, match="regex"):
        SamplingParams(regex=5)
    with pytest.raises(InvalidParamsError, match="json_schema"):
        SamplingParams(json_schema=[1])
    with pytest.raises(InvalidParamsError, match="jump_forward"):
        SamplingParams(regex="a", jump_forward="yes")


def test_engine_errors_before_any_pass(engine, tok, tiny_dir):
    plain = Engine(build_model(tiny_dir), eos_token_ids=[EOS])
    with pytest.raises(InvalidParamsError, match="needs the model's tokenizer"):
        plain.start([[5, 6]], [SamplingParams(regex="a+")])
    narrow = compile_constraint(tok, regex="a+", vocab_size=VOCAB - 8).new()
    with pytest.raises(InvalidParamsError, match="compile it with vocab_size=320"):
        plain.start([[5, 6]], [SamplingParams()], constraints=[narrow])
    with pytest.raises(InvalidConstraintError, match='"not"'):
        engine.start([[5, 6], [7, 8]], [SamplingParams(), SamplingParams(json_schema={"not": {"type": "null"}})])
    with pytest.raises(InvalidConstraintError, match="invalid regex"):
        engine.start([[5, 6]], [SamplingParams(regex="a(")])


# ---------------------------------------------------------------------- vanilla
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_constrained_output_is_valid(engine, tok, name):
    params = [SamplingParams(temperature=0, max_tokens=n, json_schema=SCHEMAS[name]) for n in (60, 40, 80)]
    rows = engine.start(PROMPTS, params).run()
    for p, r in zip(params, rows):
        valid_output(tok, p, r.output_ids, r.finish_reason)
        assert r.mask_times and r.constraint_s > 0
        if r.finish_reason == "stop" and r.output_ids[-1] != EOS:
            assert r.constraint.is_finished()   # complete and closed: no EOS needed


def test_mixed_batch_leaves_unconstrained_rows_alone(engine, tok):
    free = SamplingParams(temperature=0, max_tokens=20)
    ref = engine.start(PROMPTS[:1], [free]).run()[0].output_ids
    rows = engine.start(PROMPTS[:2], [free, SamplingParams(temperature=0, max_tokens=20, json_object=True)]).run()
    assert rows[0].output_ids == ref and rows[0].constraint is None and rows[0].mask_times == []
    valid_output(tok, rows[1].params, rows[1].output_ids, rows[1].finish_reason)


def test_eos_only_where_the_grammar_may_end(tok):
    """A model that always wants EOS still writes a complete instance; one that never wants it stops
    when the grammar is complete and cannot go on ("stop", no EOS), or at max_tokens ("length")."""
    for eos_bias, regex, expect in [(50.0, "[a-z]{3,5}", 3), (-50.0, "[a-z]{3,5}", 5)]:
        engine = Engine(RandomLogitsModel(eos_bias=eos_bias), eos_token_ids=[EOS], constrainer=constrainer(tok))
        r = engine.start([[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=30, regex=regex)]).run()[0]
        text = tok.decode([t for t in r.output_ids if t != EOS])
        assert r.finish_reason == "stop" and re.fullmatch(regex, text) and len(text) >= 3, text
        assert (r.output_ids[-1] == EOS) == (eos_bias > 0)
        if eos_bias < 0:
            assert len(text) == expect
    loose = Engine(RandomLogitsModel(eos_bias=-50.0), eos_token_ids=[EOS], constrainer=constrainer(tok))
    r = loose.start([[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=9, json_object=True)]).run()[0]
    assert r.finish_reason == "length" and len(r.output_ids) == 9   # cut mid-structure
    assert compile_constraint(tok, json_object=True, vocab_size=VOCAB).new().validate(r.output_ids) == 9


def test_ignore_eos_masks_eos_until_the_grammar_is_closed(tok):
    engine = Engine(RandomLogitsModel(eos_bias=50.0), eos_token_ids=[EOS], constrainer=constrainer(tok))
    r = engine.start([[5, 6]], [SamplingParams(temperature=0, max_tokens=12, regex="[a-z]+", ignore_eos=True)]).run()[0]
    assert EOS not in r.output_ids and r.finish_reason == "length" and len(r.output_ids) == 12
    r = engine.start([[5, 6]], [SamplingParams(temperature=0, max_tokens=12, regex="[a-z]{2}", ignore_eos=True)]).run()[0]
    assert r.finish_reason == "stop" and len(tok.decode(r.output_ids)) == 2


def test_stop_tokens_and_max_tokens_still_apply(engine, tok):
    p = SamplingParams(temperature=0, max_tokens=3, json_schema=SCHEMAS["person"])
    r = engine.start(PROMPTS[:1], [p]).run()[0]
    assert r.finish_reason == "length" and len(r.output_ids) == 3


# ---------------------------------------------------------------------- jump-forward
def test_jump_forward_appends_forced_tokens_without_sampling(engine, tok):
    schema = SCHEMAS["consts"]
    on = engine.start(PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=60, json_schema=schema)]).run()[0]
    off = engine.start(PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=60, json_schema=schema,
                                                    jump_forward=False)]).run()[0]
    for r in (on, off):
        valid_output(tok, r.params, r.output_ids, r.finish_reason)
    text = tok.decode(on.output_ids)
    assert text.startswith('{"version": "1.0.0", "kind": "city", "city": "')
    assert on.forced_tokens >= len(tok.encode('{"version": "1.0.0", "kind": "city", "city": "')) - 2
    assert off.forced_tokens == 0
    # forced tokens need no pass of their own: fewer passes than tokens (one pass per sampled token + prefill)
    assert on.target_passes <= len(on.output_ids) - on.forced_tokens + 1 < off.target_passes


def test_jump_forward_longer_than_a_pass_carries(engine, tok):
    """A forced run longer than JUMP_MAX tokens is fed over several passes; the output is the same with
    and without speculation, and the forced text is exact."""
    long = "x" * 70 + "-" + "y" * 40
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"const": long}, "c": {"type": "integer"}},
              "required": ["a", "b", "c"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=150, json_schema=schema)] * 2
    ref = engine.start(PROMPTS[:2], params).run()
    spec = engine.start(PROMPTS[:2], params, PromptLookup(num_draft=6, min_ngram=1)).run()
    assert [r.output_ids for r in spec] == [r.output_ids for r in ref]
    for r in ref:
        valid_output(tok, r.params, r.output_ids, r.finish_reason)
        if r.finish_reason == "stop":
            assert json.loads(tok.decode(r.output_ids[:-1] if r.output_ids[-1] == EOS else r.output_ids))["b"] == long
        assert r.forced_tokens > 32


def test_fully_forced_output_needs_no_decode_pass(engine, tok):
    schema = {"const": {"answer": "yes", "n": 3}}
    r = engine.start(PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=40, json_schema=schema)]).run()[0]
    assert json.loads(tok.decode(r.output_ids)) == {"answer": "yes", "n": 3}
    assert r.finish_reason == "stop" and r.target_passes == 0 and r.forced_tokens == len(r.output_ids)


# ---------------------------------------------------------------------- speculation == vanilla
def _drafters():
    return {
        "prompt_lookup": lambda: PromptLookup(num_draft=6, min_ngram=1),
        "copyspec": lambda: CopySpec(num_draft=8, gamma=2),
        "recycling": lambda: TokenRecycling(num_draft=12, top_k=4),
        "random-chain": lambda: RandomDrafter(num_draft=5, seed=1),
        "random-tree": lambda: RandomDrafter(num_draft=8, tree=True, seed=2),
    }


@pytest.mark.parametrize("jump_forward", [True, False])
@pytest.mark.parametrize("drafter", list(_drafters()))
def test_greedy_constrained_speculation_equals_vanilla(engine, tok, drafter, jump_forward):
    params = [SamplingParams(temperature=0, max_tokens=n, json_schema=SCHEMAS[s], jump_forward=jump_forward)
              for n, s in ((50, "person"), (40, "nested"), (45, "consts"))]
    params.append(SamplingParams(temperature=0, max_tokens=25))   # an unconstrained row rides along
    prompts = PROMPTS + [PROMPTS[0][:9]]
    vanilla = engine.start(prompts, params).run()
    spec = engine.start(prompts, params, _drafters()[drafter]()).run()
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in vanilla]
    assert [r.forced_tokens for r in spec] == [r.forced_tokens for r in vanilla]
    for p, r in zip(params[:3], vanilla[:3]):
        valid_output(tok, p, r.output_ids, r.finish_reason)
    if drafter.startswith("random"):
        assert sum(r.pruned for r in spec) > 0


@pytest.mark.parametrize("tree", [False, True])
def test_oracle_drafts_are_accepted_through_the_masks(engine, tok, tree):
    """Drafts of the right tokens (behind a decoy branch for trees) are accepted and pass fewer times."""
    params = [SamplingParams(temperature=0, max_tokens=n, json_schema=SCHEMAS[s], jump_forward=jf)
              for n, s, jf in ((50, "person", True), (40, "nested", False), (45, "any-of", True))]
    vanilla = engine.start(PROMPTS, params).run()
    oracle = OracleDrafter({b: r.output_ids for b, r in enumerate(vanilla)}, {b: len(p) for b, p in enumerate(PROMPTS)},
                           num_draft=5, tree=tree)
    spec = engine.start(PROMPTS, params, oracle).run()
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert sum(r.accepted for r in spec) > 0
    assert sum(r.target_passes for r in spec) < sum(r.target_passes for r in vanilla)


def test_a_verdict_cut_for_jump_forward_feeds_only_output_tokens(engine, tok):
    """Oracle drafts run into the points where the grammar forces tokens, so verdicts are cut after an
    accepted draft token there. The cache must then hold exactly what vanilla's holds: the keys of the
    prompt and the output tokens at their positions, nothing the cut verdict dropped (a token re-fed from
    the cut verdict shifts every later slot, which a tiny model's greedy output can fail to show)."""
    params = [SamplingParams(temperature=0, max_tokens=n, json_schema=SCHEMAS[s], jump_forward=True)
              for n, s in ((50, "person"), (45, "consts"))]
    prompts = PROMPTS[:2]
    vanilla = engine.start(prompts, params, keep_kv=True)
    vanilla.run()
    vanilla.cache = vanilla.kv_snapshot()
    outputs = {b: r.output_ids for b, r in enumerate(vanilla.rows)}
    oracle = OracleDrafter(outputs, {b: len(p) for b, p in enumerate(prompts)}, num_draft=6)
    spec = engine.start(prompts, params, oracle, keep_kv=True)
    spec.run()
    spec.cache = spec.kv_snapshot()
    assert [r.output_ids for r in spec.rows] == [r.output_ids for r in vanilla.rows]
    assert sum(r.forced_tokens for r in spec.rows) > 0 and sum(r.accepted for r in spec.rows) > 0
    for b in range(len(prompts)):
        n = min(vanilla.cache.lengths[b], spec.cache.lengths[b])
        assert n >= len(prompts[b]) + len(outputs[b]) - 1
        for layer in range(engine.config.num_layers):
            k_v, v_v = vanilla.cache.view(layer, n)
            k_s, v_s = spec.cache.view(layer, n)
            torch.testing.assert_close(k_s[b], k_v[b], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v_s[b], v_v[b], atol=1e-4, rtol=1e-4)


def test_sampled_constrained_speculation_is_valid_and_seeded(engine, tok):
    params = [SamplingParams(temperature=1.0, top_k=50, seed=s, max_tokens=50, json_schema=SCHEMAS["person"],
                             repetition_penalty=1.1) for s in (1, 2, 3)]
    for drafter in (None, PromptLookup(num_draft=4, min_ngram=1), RandomDrafter(num_draft=6, tree=True, seed=4)):
        rows = engine.start(PROMPTS, params, drafter).run()
        again = engine.start(PROMPTS, params, type(drafter)(**_knobs(drafter)) if drafter else None).run()
        for p, r, r2 in zip(params, rows, again):
            valid_output(tok, p, r.output_ids, r.finish_reason)
            assert r.output_ids == r2.output_ids


@pytest.mark.parametrize("tree", [False, True])
def test_draft_model_with_probabilities_under_constraints(engine, tok, tiny_dir, tmp_path, tree):
    """A draft model (its own q, chains or trees drawn without replacement) through the grammar's pruning:
    greedy equals vanilla; sampled outputs are valid and reproducible."""
    from leaplm.speculative.drafters import DraftModel

    other = build_model(build_tiny_llm(tmp_path / "draft", tok, seed="a draft"))
    knobs = dict(num_draft=4, confidence=0.0, adaptive=False, quantization=None)
    if tree:
        knobs.update(tree_top_k=3, tree_extra=4, tree_min_prob=0.0)

    def drafter():
        d = DraftModel(other, **knobs)
        d.bind(engine.model)
        return d

    greedy = [SamplingParams(temperature=0, max_tokens=40, json_schema=SCHEMAS[s]) for s in ("person", "nested")]
    vanilla = engine.start(PROMPTS[:2], greedy).run()
    spec = engine.start(PROMPTS[:2], greedy, drafter()).run()
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert sum(r.drafted for r in spec) > 0
    sampled = [SamplingParams(temperature=0.9, seed=5 + i, max_tokens=40, json_schema=SCHEMAS[s], jump_forward=i == 0)
               for i, s in enumerate(("person", "nested"))]
    a = engine.start(PROMPTS[:2], sampled, drafter()).run()
    b = engine.start(PROMPTS[:2], sampled, drafter()).run()
    for p, r, r2 in zip(sampled, a, b):
        valid_output(tok, p, r.output_ids, r.finish_reason)
        assert r.output_ids == r2.output_ids


def _knobs(d):
    if isinstance(d, PromptLookup):
        return {"num_draft": d.num_draft, "min_ngram": d.min_ngram}
    return {"num_draft": d.num_draft, "tree": d.tree, "seed": 4}


# ---------------------------------------------------------------------- property: nothing invalid gets through
@pytest.mark.parametrize("name", list(SCHEMAS) + ["json-object"])
def test_random_logits_never_produce_invalid_json(tok, name):
    """Random logits, sampled at temperature 1, plus random drafts (chains and trees of arbitrary ids):
    every finished output is valid JSON under its schema; every cut one is a valid prefix."""
    params_kw = {"json_object": True} if name == "json-object" else {"json_schema": SCHEMAS[name]}
    seen_stop = 0
    for seed in range(12):
        model = RandomLogitsModel(seed=seed, scale=2.0, eos_bias=float(seed % 3))
        engine = Engine(model, eos_token_ids=[EOS], constrainer=constrainer(tok))
        drafter = [None, RandomDrafter(num_draft=5, seed=seed), RandomDrafter(num_draft=7, tree=True, seed=seed)][seed % 3]
        params = [SamplingParams(temperature=1.0, seed=seed * 10 + i, max_tokens=60, jump_forward=bool(i % 2),
                                 **params_kw) for i in range(3)]
        rows = engine.start([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params, drafter).run()
        for p, r in zip(params, rows):
            valid_output(tok, p, r.output_ids, r.finish_reason)
            seen_stop += r.finish_reason == "stop"
    assert seen_stop >= 6


def test_random_walk_masks_allow_only_valid_continuations(tok):
    """Token by token through the engine's masks: at each step every allowed id is accepted by the grammar
    and a random disallowed id is not (the mask is exactly the grammar)."""
    compiled = compile_constraint(tok, json_schema=SCHEMAS["nested"], vocab_size=VOCAB)
    rng = random.Random(0)
    for _ in range(5):
        c = compiled.new()
        masks = allocate_bitmask(1, VOCAB)
        for _ in range(80):
            if c.is_finished():
                break
            constrain_draft(c, Draft([]), masks)
            allowed = set(torch.nonzero(c.mask()).view(-1).tolist())
            assert set(unpack_bitmask(masks[0], VOCAB).nonzero().view(-1).tolist()) == allowed
            bad = rng.choice([t for t in range(VOCAB) if t not in allowed])
            assert c.validate([bad]) == 0
            choice = rng.choice(sorted(allowed - {EOS}) or [EOS])
            c.advance([choice])


# ---------------------------------------------------------------------- constrain_draft, feed layout
def test_constrain_draft_prunes_chains_and_trees(tok):
    compiled = compile_constraint(tok, regex=r"[a-c]{2}(c|d)e+", vocab_size=VOCAB)
    ids = {ch: tok.encode(ch, add_special_tokens=False)[0] for ch in "abcdexy"}
    a, b, c_, d, e, x, y = (ids[ch] for ch in "abcdexy")
    c = compiled.new()
    masks = torch.zeros(9, bitmask_width(VOCAB), dtype=torch.int32)
    # chain: cut at the first rejected token; the cursor is left where it was
    kept = constrain_draft(c, Draft([a, b, x, c_]), masks, jump_forward=False)
    assert kept.tokens == [a, b] and kept.parents is None and c.num_tokens == 0
    step = compiled.new()
    for i, t in enumerate([a, b]):   # masks line up with the stepwise masks
        assert torch.equal(masks[i], step.bitmask())
        step.advance([t])
    assert torch.equal(masks[2], step.bitmask())
    # tree: root -> a -> {x -> e, b -> {c, y, d -> e}}: x, y and what hangs below x are dropped
    tree = Draft([a, x, b, c_, y, d, e, e], parents=[-1, 0, 0, 2, 2, 2, 5, 1])
    kept = constrain_draft(c, tree, masks, jump_forward=False)
    assert kept.tokens == [a, b, c_, d, e] and kept.parents == [-1, 0, 1, 1, 3] and c.num_tokens == 0
    for j, path in enumerate([[a], [a, b], [a, b, c_], [a, b, d], [a, b, d, e]]):
        s = compiled.new()
        s.advance(path)
        assert torch.equal(masks[1 + j], s.bitmask()), j
    # with draft probabilities a dropped node drops its later siblings (siblings are tried in draw order)
    tree = Draft([a, b, c_, y, d, e], parents=[-1, 0, 1, 1, 1, 4])
    assert constrain_draft(c, tree, masks, jump_forward=False).tokens == [a, b, c_, d, e]
    probs = torch.rand(6, VOCAB)
    kept = constrain_draft(c, Draft(tree.tokens, probs, tree.parents), masks, jump_forward=False)
    assert kept.tokens == [a, b, c_] and kept.parents == [-1, 0, 1]
    assert torch.equal(kept.probs, probs[[0, 1, 2]])
    # an EOS node is kept where the grammar may end; nothing hangs below it
    kept = constrain_draft(c, Draft([a, b, c_, e, EOS, e]), masks, jump_forward=False)
    assert kept.tokens == [a, b, c_, e, EOS]


def test_constrain_draft_stops_below_forced_and_finished_nodes(tok):
    compiled = compile_constraint(tok, regex=r"a(bcd|x)", vocab_size=VOCAB)
    ids = {ch: tok.encode(ch, add_special_tokens=False)[0] for ch in "abcdx"}
    c = compiled.new()
    masks = torch.zeros(6, bitmask_width(VOCAB), dtype=torch.int32)
    draft = Draft([ids["a"], ids["b"], ids["c"], ids["d"]])
    assert constrain_draft(c, draft, masks, jump_forward=False).tokens == draft.tokens
    kept = constrain_draft(c, draft, masks, jump_forward=True)    # after "ab" the grammar forces "cd"
    assert kept.tokens == [ids["a"], ids["b"]] and bool((masks[2] == -1).all())
    kept = constrain_draft(c, Draft([ids["a"], ids["x"], EOS]), masks, jump_forward=False)
    assert kept.tokens == [ids["a"], ids["x"]]                      # "ax" is complete: only EOS, not kept below


def test_feed_parents_put_the_draft_below_the_pending_tokens():
    assert feed_parents(1, Draft([4, 5])) == [-1, 0]
    assert feed_parents(3, Draft([4, 5])) == [-1, 0, 1, 2]
    assert feed_parents(3, Draft([4, 5, 6], parents=[-1, -1, 0])) == [-1, 0, 1, 1, 2]
    assert depths(feed_parents(3, Draft([4, 5, 6], parents=[-1, -1, 0]))) == [1, 2, 3, 3, 4]


def test_empty_mask_is_an_error_not_nan(engine, tok):
    class Stuck:
        vocab_size = VOCAB
        num_tokens = 0

        def fill_mask(self, into):
            into.zero_()

        def forced(self):
            return []

        def is_finished(self):
            return False

    with pytest.raises(ConstraintError, match="allows no token"):
        engine.start(PROMPTS[:1], [SamplingParams(temperature=0)], constraints=[Stuck()]).run()


# ---------------------------------------------------------------------- the LLM API on the tiny folder
def test_llm_compiles_before_generating_and_reports_forced_tokens(tiny_dir, monkeypatch):
    from leaplm import LLM

    llm = LLM(str(tiny_dir), max_batch_size=1)
    started = []
    real_start = llm.engine.start
    monkeypatch.setattr(llm.engine, "start", lambda *a, **k: started.append(1) or real_start(*a, **k))
    good = SamplingParams(temperature=0, max_tokens=30, json_schema=SCHEMAS["consts"])
    bad = SamplingParams(temperature=0, max_tokens=30, json_schema={"type": "array", "uniqueItems": True})
    with pytest.raises(InvalidConstraintError, match="uniqueItems"):
        llm.generate(["hello", "world"], [good, bad], use_tqdm=False)
    assert started == []          # the bad schema of the second batch failed the call before the first ran
    out = llm.generate("hello", good, use_tqdm=False)[0]
    assert out.metrics["forced_tokens"] > 5 and out.metrics["constraint_s"] > 0
    assert out.text.startswith('{"version": "1.0.0"')
    assert "".join(llm.stream("hello", good)) == out.text
    spec = llm.generate("hello", good, use_tqdm=False, speculative="prompt_lookup")[0]
    assert spec.token_ids == out.token_ids


# ---------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smol_llm(smollm_gguf):
    from leaplm import LLM

    return LLM(str(smollm_gguf), max_batch_size=16)


REAL_SCHEMAS = {
    "weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "temperature_c": {"type": "number"},
        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]}},
        "required": ["city", "temperature_c", "conditions"], "additionalProperties": False},
    "people": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}},
}


@pytest.mark.real
def test_real_constrained_speculation_equals_vanilla(smol_llm):
    msgs = [[{"role": "user", "content": "Give the weather in Paris today as JSON."}],
            [{"role": "user", "content": "List two friends with their ages, as JSON."}]]
    drafters = {True: ("prompt_lookup", {"method": "copyspec"}, {"method": "recycling"}),
                False: ({"method": "recycling"},)}
    for jf, specs in drafters.items():
        params = [SamplingParams(temperature=0, max_tokens=40, json_schema=s, jump_forward=jf)
                  for s in REAL_SCHEMAS.values()]
        ref = smol_llm.chat(msgs, params, use_tqdm=False)
        for p, o in zip(params, ref):
            if o.finish_reason == "stop":
                jsonschema.validate(json.loads(o.text), p.json_schema)
        for spec in specs:
            out = smol_llm.chat(msgs, params, use_tqdm=False, speculative=spec)
            assert [o.token_ids for o in out] == [o.token_ids for o in ref], (spec, jf)
        assert (sum(o.metrics["forced_tokens"] for o in ref) > 0) == jf


@pytest.mark.real
def test_real_json_schema_test_suite_subset_validates(smol_llm):
    """Generated instances of accepted JSON-Schema-Test-Suite schemas validate under jsonschema (a subset
    that runs in well under a minute; scripts/json_schema_generate.py does them all). A small model can
    run on (digits of an unbounded integer, a long string): outputs cut at max_tokens must be valid prefixes."""
    from pathlib import Path

    suite = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "json-schema-test-suite"
    if not (suite / "tests" / "draft2020-12").is_dir():
        pytest.skip(f"{suite} not present")
    files = {"enum.json": 2, "const.json": 2, "allOf.json": 2, "minimum.json": 2, "required.json": 1,
             "minLength.json": 1, "maxItems.json": 1, "anyOf.json": 1, "pattern.json": 1, "properties.json": 1,
             "type.json": 1}
    schemas = []
    for f, n in files.items():
        for case in json.loads((suite / "tests" / "draft2020-12" / f).read_text())[:n]:
            try:
                smol_llm.compile_constraint(SamplingParams(json_schema=case["schema"]))
            except InvalidConstraintError:
                continue
            schemas.append((f, case["description"], case["schema"]))
    assert len(schemas) == 15
    prompts = [[{"role": "user", "content": f"Write a JSON value that matches this JSON schema: {json.dumps(s)}"}]
               for _, _, s in schemas]
    params = [SamplingParams(temperature=0, max_tokens=40, json_schema=s) for _, _, s in schemas]
    outs = smol_llm.chat(prompts, params, use_tqdm=False)
    finished = 0
    for (f, desc, schema), p, o in zip(schemas, params, outs):
        if o.finish_reason == "stop":
            finished += 1
            value = json.loads(o.text)
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
            assert not errors, (f, desc, o.text, errors)
        else:
            assert smol_llm.compile_constraint(p).new().validate(o.token_ids) == len(o.token_ids)
    assert finished >= 10


def test_constrained_requests_arriving_into_a_busy_small_pool_give_their_output_alone(tiny_dir, tok):
    """Continuous batching with grammars: constrained (jump-forward on and off) and free requests arrive at
    different steps into a KV pool small enough to preempt; half speculate. Each output equals its output alone
    and is grammar-valid."""
    import random

    from leaplm.engine import LLMEngine
    from leaplm.engine.kv_pool import KVPool
    from leaplm.speculative.drafters import PromptLookup

    model = build_model(tiny_dir)
    names = ["person", "nested", "any-of", "consts", None, "person"]
    params = [SamplingParams(temperature=0, max_tokens=40, jump_forward=i % 2 == 0,
                             **({"json_schema": SCHEMAS[n]} if n else {"ignore_eos": True}))
              for i, n in enumerate(names)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]

    def new_engine(tokens_of_kv=None):
        memory = None if tokens_of_kv is None else tokens_of_kv * KVPool.bytes_per_token(model.config)
        return LLMEngine(model, eos_token_ids=[EOS], constrainer=constrainer(tok), kv_cache_memory=memory,
                         block_size=4, max_num_seqs=4)

    alone = []
    for p, s in zip(prompts, params):
        e = new_engine()
        rid = e.add_request(p, s)
        while e.has_unfinished():
            e.step()
        alone.append(e.get_request(rid).output_ids)
    engine = new_engine(tokens_of_kv=84)
    rng = random.Random(4)
    arrive = {i: rng.randrange(0, 4) for i in range(len(names))}
    rids: dict[int, int] = {}
    step = 0
    while len(rids) < len(names) or engine.has_unfinished():
        for i in range(len(names)):
            if i not in rids and arrive[i] <= step:
                rids[i] = engine.add_request(prompts[i], params[i],
                                             speculative=PromptLookup(num_draft=4, min_ngram=1) if i % 2 else None)
        engine.step()
        step += 1
    for i, rid in rids.items():
        r = engine.get_request(rid)
        assert r.output_ids == alone[i], (i, names[i])
        if names[i]:
            valid_output(tok, params[i], r.output_ids, r.finish_reason)
    assert engine.stats()["preemptions"] > 0 and engine.stats()["kv_blocks_used"] == 0
