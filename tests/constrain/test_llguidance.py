"""Tests of leaplm.constrain with the llguidance backend.

Without a checkpoint: the bitmask helpers and a tiny byte-level BPE tokenizer (vocab padding, errors, EOS).
``real`` (SmolLM2's GGUF tokenizer, 49k vocab): random walks that pick random allowed tokens until the grammar
is complete always give JSON valid under ``jsonschema`` (several schemas), regex and Lark walks, validate() does
not mutate, rollback restores, forced() jump-forward, draft masks, batch masks, errors, the JSON Schema Test
Suite survey (skipped without ../shared).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from leaplm.constrain import (Constraint, CompiledConstraint, allocate_bitmask, apply_bitmask_, bitmask_width,
                              compile_constraint, fill_bitmasks, unpack_bitmask)
from leaplm.errors import ConstraintError, InvalidConstraintError, InvalidParamsError
from leaplm.tokenizer import Tokenizer

from ..structured_helpers import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT.parent / "shared" / "data" / "json-schema-test-suite"


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    """A byte-level BPE tokenizer (~300 ids, EOS ``<eos>``) trained in-process: no checkpoint needed."""
    return tiny_tokenizer(['{"name": "Bob", "age": 12}', "hello world 123 abc", '[1, 2, 3]'])


@pytest.fixture(scope="module")
def smol(smollm_gguf, tmp_path_factory) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:  # never write the user's tokenizer cache
        mp.setenv("LEAPLM_CACHE", str(tmp_path_factory.mktemp("leaplm-cache")))
        return Tokenizer.from_path(smollm_gguf)


# ---------------------------------------------------------------------- random walks
class Walker:
    """Random walks through a constraint: uniformly random allowed tokens for ``free`` steps, then tokens that
    close things (``"`` inside a JSON string; ``}`` ``]`` ``)`` ``"`` outside) or random one-character ones,
    so every walk ends."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.eos = tok, set(tok.eos_token_ids)
        self.text = {i: tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)}
        self.by_text = {}
        for i, s in self.text.items():
            self.by_text.setdefault(s, i)
        self.short = {i for i, s in self.text.items() if len(s) == 1 and s.isprintable() and s != "\\"}

    @staticmethod
    def _in_json_string(text: str) -> bool:
        inside, escaped = False, False
        for ch in text:
            if escaped:
                escaped = False
            elif ch == "\\" and inside:
                escaped = True
            elif ch == '"':
                inside = not inside
        return inside

    def _finish_pick(self, allowed: list[int], out: list[int], rng: random.Random) -> int:
        in_str = self._in_json_string(self.tok.decode(out))
        allowed_set = set(allowed)
        for p in ('"',) if in_str else ("}", "]", ")", '"'):
            if self.by_text.get(p) in allowed_set:
                return self.by_text[p]
        cands = [t for t in allowed if t in self.short and not (in_str and self.text[t] in "}]")]
        return rng.choice(cands or allowed)

    def walk(self, c: Constraint, rng: random.Random, free: int, use_forced: bool = True,
             max_steps: int = 800) -> list[int]:
        out: list[int] = []
        for step in range(max_steps):
            if c.is_finished():
                break
            if use_forced and rng.random() < 0.5 and (ff := c.forced()):
                assert c.validate(ff) == len(ff)
                c.advance(ff)
                out += ff
                continue
            allowed = c.allowed_ids()
            assert allowed, "empty mask"
            assert any(t in self.eos for t in allowed) == c.can_stop(), "EOS allowed <=> can_stop()"
            if step < free:
                if c.can_stop() and rng.random() < 0.15:
                    break
                t = rng.choice([t for t in allowed if t not in self.eos])
            else:
                if c.can_stop():
                    break
                t = self._finish_pick(allowed, out, rng)
            c.advance([t])
            out.append(t)
        else:
            pytest.fail(f"walk did not finish in {max_steps} steps: {self.tok.decode(out)!r}")
        assert c.can_stop()
        return out


@pytest.fixture(scope="module")
def walker(smol) -> Walker:
    return Walker(smol)


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "format": "email"},
            "born": {"type": "string", "format": "date"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
            "role": {"enum": ["admin", "user", None, 3]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "open-object": {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}}},
    "array-of-objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                                   "y": {"type": "integer", "exclusiveMinimum": 3}},
                  "required": ["x", "y"], "additionalProperties": False},
    },
    "any-of": {"anyOf": [{"type": "string", "pattern": "^[A-Z][a-z]{2,5}-[0-9]{3}$"}, {"type": "integer"},
                         {"type": "null"}, {"type": "array", "items": {"type": "boolean"}}]},
    "const-and-uuid": {"type": "object",
                       "properties": {"v": {"const": "1.0"}, "id": {"type": "string", "format": "uuid"},
                                      "n": {"type": "number"}},
                       "required": ["v", "id", "n"], "additionalProperties": False},
    "recursive-tree": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["value"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "string-lengths": {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}},
                       "required": ["s"], "additionalProperties": False},
    "json-object": None,  # compile_constraint(json_object=True)
}


def _compile_schema(tok, name):
    s = SCHEMAS[name]
    return compile_constraint(tok, json_object=True) if s is None else compile_constraint(tok, json_schema=s)


# ---------------------------------------------------------------------- no checkpoint
def test_bitmask_helpers():
    g = torch.Generator().manual_seed(0)
    for v in (1, 31, 32, 33, 100, 49152):
        allowed = torch.rand(3, v, generator=g) < 0.3
        words = torch.zeros(3, bitmask_width(v) * 32, dtype=torch.int64)
        words[:, :v] = allowed.long()
        packed = (words.view(3, -1, 32) << torch.arange(32)).sum(-1)
        packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        assert torch.equal(unpack_bitmask(packed, v), allowed)
        logits = torch.randn(3, v, generator=g)
        out = apply_bitmask_(logits.clone(), packed)
        assert torch.equal(torch.isinf(out), ~allowed) and torch.equal(out[allowed], logits[allowed])
    assert allocate_bitmask(2, 33).shape == (2, 2) and unpack_bitmask(allocate_bitmask(2, 33), 33).all()


def test_tiny_tokenizer_padding_and_eos(tiny):
    v = tiny.vocab_size + 45  # the model's embedding is padded past the tokenizer
    compiled = compile_constraint(tiny, regex=r"abc[0-9]{1,3}", vocab_size=v)
    assert isinstance(compiled, CompiledConstraint) and compiled.vocab_size == v
    c = compiled.new()
    assert isinstance(c, Constraint)
    rng, ids = random.Random(0), []
    while not c.can_stop():
        m = c.mask()
        assert m.shape == (v,) and not m[tiny.vocab_size:].any() and not m[tiny.hf.eos_token_id]
        ids.append(rng.choice(m.nonzero().view(-1).tolist()))
        c.advance(ids[-1:])
    assert re.fullmatch(r"abc[0-9]{1,3}", tiny.decode(ids))
    assert c.mask()[tiny.hf.eos_token_id] and not c.mask()[tiny.vocab_size:].any()
    c.advance([tiny.hf.eos_token_id])
    assert c.is_finished() and c.allowed_ids() == [tiny.hf.eos_token_id]


def test_tiny_tokenizer_narrower_model(tiny):
    v = tiny.vocab_size - 5  # the tokenizer has ids the model cannot produce
    c = compile_constraint(tiny, regex=r"[a-z ]+", vocab_size=v).new()
    bits = torch.zeros(bitmask_width(v), dtype=torch.int32)
    c.fill_mask(bits)
    assert unpack_bitmask(bits, v).sum() > 0
    full = torch.zeros(v, dtype=torch.bool)
    c.fill_mask(full)
    assert torch.equal(full, unpack_bitmask(bits, v))


def test_exactly_one_input_and_types(tiny):
    with pytest.raises(InvalidConstraintError, match="exactly one"):
        compile_constraint(tiny)
    with pytest.raises(InvalidConstraintError, match="got regex, grammar"):
        compile_constraint(tiny, regex="a", grammar="start: \"a\"")
    with pytest.raises(InvalidConstraintError, match="not valid JSON"):
        compile_constraint(tiny, json_schema="{bad")
    with pytest.raises(InvalidConstraintError, match="must be a JSON object or a boolean"):
        compile_constraint(tiny, json_schema=[1, 2])
    with pytest.raises(InvalidConstraintError, match="schema is false"):
        compile_constraint(tiny, json_schema=False)
    assert compile_constraint(tiny, json_schema=True).new().validate(tiny.encode("[1]", add_special_tokens=False))
    assert issubclass(InvalidConstraintError, InvalidParamsError)


def test_fill_mask_shape_errors(tiny):
    c = compile_constraint(tiny, regex="a+").new()
    with pytest.raises(ValueError, match="int32"):
        c.fill_mask(torch.zeros(7, dtype=torch.int32))
    with pytest.raises(ValueError, match="fill_draft_masks"):
        c.fill_draft_masks([1, 2], torch.zeros(2, bitmask_width(c.vocab_size), dtype=torch.int32))


# ---------------------------------------------------------------------- real tokenizer: JSON schema walks
@pytest.mark.real
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_random_walks_validate(smol, walker, name):
    import jsonschema

    compiled = _compile_schema(smol, name)
    schema = SCHEMAS[name] or {"type": "object"}
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for seed in range(6):
        rng = random.Random(f"{name}-{seed}")
        c = compiled.new()
        ids = walker.walk(c, rng, free=rng.choice([0, 5, 20, 60]), use_forced=seed % 2 == 0)
        text = smol.decode(ids)
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{text!r}: {errors}"
        assert text == text.strip()  # compact form: no whitespace outside the separators
        fresh = compiled.new()
        eos = min(smol.eos_token_ids)
        assert fresh.validate(ids + [eos]) == len(ids) + 1
        assert fresh.num_tokens == 0 and fresh.forced() == compiled.new().forced()
        c.advance([eos])
        assert c.is_finished() and not c.can_stop() and c.allowed_ids() == sorted(smol.eos_token_ids)


@pytest.mark.real
def test_regex_random_walks(smol, walker):
    pattern = r"(\+1 )?\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}( ext\. [0-9]{1,4})?"
    compiled = compile_constraint(smol, regex=pattern)
    for seed in range(8):
        rng = random.Random(seed)
        ids = walker.walk(compiled.new(), rng, free=rng.choice([0, 10, 40]))
        assert re.fullmatch(pattern, smol.decode(ids)), smol.decode(ids)


@pytest.mark.real
def test_lark_grammar_random_walks(smol, walker):
    lark = r"""
        start: expr
        expr: term (("+" | "-") term)*
        term: factor (("*" | "/") factor)*
        factor: NUMBER | "(" expr ")"
        NUMBER: /[0-9]{1,3}/
    """
    compiled = compile_constraint(smol, grammar=lark)
    for seed in range(8):
        rng = random.Random(seed)
        text = smol.decode(walker.walk(compiled.new(), rng, free=rng.choice([0, 10, 30])))
        assert re.fullmatch(r"[0-9+\-*/()]+", text) and text.count("(") == text.count(")"), text
        eval(compile(text.replace("/", "*"), "<walk>", "eval"))  # a well-formed arithmetic expression


@pytest.mark.real
def test_gbnf_grammar_is_accepted(smol):
    c = compile_constraint(smol, grammar='root ::= "yes" | "no"').new()
    assert c.validate(smol.encode("yes", add_special_tokens=False)) == 1
    assert c.validate(smol.encode("maybe", add_special_tokens=False)) == 0


# ---------------------------------------------------------------------- state
@pytest.mark.real
def test_validate_does_not_mutate_and_rollback_restores(smol, walker):
    compiled = _compile_schema(smol, "person")
    ref = compiled.new()
    ids = walker.walk(ref, random.Random(7), free=30)
    eos = min(smol.eos_token_ids)
    c = compiled.new()
    masks, forced = [], []
    for i, t in enumerate(ids):
        masks.append(c.bitmask())
        forced.append(c.forced())
        before = (c.num_tokens, c.can_stop())
        assert c.validate(ids[i:] + [eos]) == len(ids) - i + 1
        assert c.validate([t, 5, 5]) == 1 and c.validate([eos]) == int(c.can_stop())
        assert (c.num_tokens, c.can_stop()) == before and torch.equal(c.bitmask(), masks[-1])
        c.advance([t])
    c.advance([eos])
    assert c.num_tokens == len(ids) + 1 and c.validate([eos]) == 0
    rng = random.Random(3)
    while c.num_tokens:  # roll back in random chunks: every intermediate state is as it was going forward
        c.rollback(rng.randint(1, min(9, c.num_tokens)))
        if c.num_tokens < len(ids):
            assert torch.equal(c.bitmask(), masks[c.num_tokens]) and c.forced() == forced[c.num_tokens]
    assert torch.equal(c.bitmask(), compiled.new().bitmask())
    c.advance(ids)  # and forward again
    assert c.can_stop()
    with pytest.raises(ValueError, match="cannot roll back"):
        c.rollback(len(ids) + 1)


@pytest.mark.real
def test_advance_is_all_or_nothing(smol):
    c = compile_constraint(smol, regex=r"abc[0-9]+").new()
    good = smol.encode("abc12", add_special_tokens=False)
    bad = good + smol.encode("x", add_special_tokens=False)
    with pytest.raises(ConstraintError, match=r"position 3 of 4"):
        c.advance(bad)
    assert c.num_tokens == 0 and c.validate(good) == len(good)
    eos = min(smol.eos_token_ids)
    with pytest.raises(ConstraintError, match="EOS is not allowed yet"):
        c.advance(good[:1] + [eos])
    assert c.num_tokens == 0
    c.advance(good + [eos])
    assert c.is_finished()
    with pytest.raises(ConstraintError, match="EOS was already consumed"):
        c.advance([eos])
    c.rollback(1)
    assert not c.is_finished() and c.can_stop() and c.validate(smol.encode("3", add_special_tokens=False)) == 1


@pytest.mark.real
def test_forced_jump_forward_fixed_key(smol):
    schema = {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius"]}},
              "required": ["location", "unit"], "additionalProperties": False}
    c = compile_constraint(smol, json_schema=schema).new()
    ids = c.forced()
    assert smol.decode(ids).startswith('{"location"'), smol.decode(ids)
    c.advance(ids)
    value = smol.encode('{"location": "Paris"'[len(smol.decode(ids)):], add_special_tokens=False)
    c.advance(value)  # what the model samples
    ids += value
    ff = c.forced()  # the second key and its only value are forced
    assert smol.decode(ff).startswith(', "unit": "celsius'), smol.decode(ff)
    c.advance(ff)
    ids += ff
    while not c.can_stop():
        ids += (step := c.forced() or c.allowed_ids()[:1])
        c.advance(step)
    assert json.loads(smol.decode(ids)) == {"location": "Paris", "unit": "celsius"}
    assert c.forced() == [] and c.is_finished()


@pytest.mark.real
def test_forced_is_empty_when_there_is_a_choice(smol):
    c = compile_constraint(smol, json_schema={"anyOf": [{"type": "integer"}, {"type": "string"}]}).new()
    assert c.forced() == []
    assert compile_constraint(smol, regex="hello world").new().forced() != []


# ---------------------------------------------------------------------- speculative verification / batch
@pytest.mark.real
def test_fill_draft_masks_matches_stepwise(smol, walker):
    compiled = _compile_schema(smol, "array-of-objects")
    ids = walker.walk(compiled.new(), random.Random(11), free=20)
    eos = min(smol.eos_token_ids)
    w = bitmask_width(smol.vocab_size)
    c = compiled.new()
    c.advance(ids[:3])
    for draft in (ids[3:9], ids[3:6] + [17, 18], [17] + ids[3:5], ids[3:] + [eos, 5], []):
        rows = torch.zeros(len(draft) + 2, w, dtype=torch.int32)
        n = c.fill_draft_masks(draft, rows)
        assert n == c.validate(draft) and c.num_tokens == 3
        step = c.copy()
        for i in range(n + 1):
            assert torch.equal(rows[i], step.bitmask()), i
            if i < n:
                step.advance([draft[i]])
        for i in range(n + 1, len(draft) + 1):
            assert torch.equal(rows[i], rows[n])
        assert not rows[len(draft) + 1].any()  # rows past k + 1 are left alone
    # verification outcome: accept 2 draft tokens + a target token, then roll back a drafter's optimistic advance
    draft = ids[3:7]
    c.advance(draft[:2] + [ids[5]])
    assert c.num_tokens == 6
    c.rollback(3)
    assert c.num_tokens == 3


@pytest.mark.real
def test_fill_bitmasks_batch(smol, walker):
    a, b = _compile_schema(smol, "person"), compile_constraint(smol, regex="[a-z]+")
    cs = [a.new(), None, b.new(), a.new()]
    cs[3].advance(walker.walk(a.new(), random.Random(1), free=5)[:4])
    cs[2].advance(smol.encode("abc", add_special_tokens=False))
    rows = torch.zeros(4, bitmask_width(smol.vocab_size), dtype=torch.int32)
    fill_bitmasks(cs, rows)
    for c, row in zip(cs, rows):
        assert torch.equal(row, c.bitmask() if c is not None else torch.full_like(row, -1))


# ---------------------------------------------------------------------- errors, cache, limits
@pytest.mark.real
@pytest.mark.parametrize("schema,needle", [
    ({"type": "object", "not": {"required": ["a"]}}, '"not"'),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, '"dependentSchemas"'),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, '"uniqueItems"'),
    ({"type": "array", "contains": {"type": "integer"}}, '"contains"'),
    ({"if": {"type": "string"}, "then": {"minLength": 2}}, '"if"'),
    ({"type": "string", "format": "idn-hostname"}, "Unknown format: idn-hostname"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater than maxLength (2)"),
])
def test_unsupported_schema_features_name_the_feature(smol, schema, needle):
    with pytest.raises(InvalidConstraintError) as ei:
        compile_constraint(smol, json_schema=schema)
    assert needle in str(ei.value) and str(ei.value).startswith("cannot use this JSON schema")
    with pytest.raises(InvalidConstraintError):  # cached failure: same error again
        compile_constraint(smol, json_schema=schema)


@pytest.mark.real
def test_x_guidance_lenient_cannot_hide_unsupported_features(smol):
    with pytest.raises(InvalidConstraintError, match='"not"'):
        compile_constraint(smol, json_schema={"type": "object", "not": {}, "x-guidance": {"lenient": True}})


@pytest.mark.real
@pytest.mark.parametrize("regex,needle", [("[a-z]+(", "unclosed group"), ("a{3,1}", "invalid repetition"),
                                          ("(?<=a)b", "look-around"), (r"(a)\1", "backreferences")])
def test_invalid_regex(smol, regex, needle):
    with pytest.raises(InvalidConstraintError, match="invalid regex") as ei:
        compile_constraint(smol, regex=regex)
    assert needle in str(ei.value)


@pytest.mark.real
def test_invalid_grammar(smol):
    with pytest.raises(InvalidConstraintError, match='unknown name: "bar"'):
        compile_constraint(smol, grammar='start: foo\nfoo: "a" | bar')


@pytest.mark.real
def test_cache_and_timeout(smol):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    g1 = compile_constraint(smol, json_schema=schema)
    assert compile_constraint(smol, json_schema=json.dumps(schema)) is g1
    assert compile_constraint(smol, json_schema=schema, whitespace_flexible=True) is not g1
    assert compile_constraint(smol, json_schema=schema, vocab_size=smol.vocab_size + 64).vocab_size == \
        smol.vocab_size + 64
    big = {"enum": [f"item-{i}-{'x' * (i % 7)}" for i in range(30000)]}  # ~60 ms to compile
    with pytest.raises(InvalidConstraintError, match="longer than 0.0001 s"):
        compile_constraint(smol, json_schema=big, timeout_s=1e-4)
    with pytest.raises(InvalidConstraintError, match="timeout_s must be > 0"):
        compile_constraint(smol, json_schema=schema, timeout_s=0)


@pytest.mark.real
def test_whitespace_modes(smol):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    strict, loose = (compile_constraint(smol, json_schema=schema, whitespace_flexible=f).new() for f in (False, True))
    spaced = smol.encode('{ "a" :  1 }', add_special_tokens=False)
    compact = smol.encode('{"a": 1}', add_special_tokens=False)
    assert strict.validate(compact) == len(compact) and strict.validate(spaced) < len(spaced)
    assert loose.validate(spaced) == len(spaced)


# ---------------------------------------------------------------------- JSON Schema Test Suite
def _suite_module():
    spec = importlib.util.spec_from_file_location("json_schema_suite", ROOT / "scripts" / "json_schema_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.real
def test_json_schema_test_suite(smol):
    if not (SUITE / "tests" / "draft2020-12").is_dir():
        pytest.skip(f"{SUITE} not present")
    mod = _suite_module()
    s = mod.survey(smol, SUITE, "draft2020-12")
    print("\n" + mod.report(s, 10, "draft2020-12"))
    assert s.total == sum(len(json.loads(p.read_text())) for p in mod.suite_files(SUITE, "draft2020-12"))
    assert s.accepted >= 150 and s.rejected >= 1
    for f, desc, msg in s.rejections:  # every rejection says why
        reason = msg.split("structured output:", 1)[-1].strip()
        assert reason, (f, desc, msg)
    # the grammar never lets an instance through that the suite calls invalid
    assert s.instances["invalid_accepted"] == 0, [m for m in s.mismatches if m[0] == "invalid_accepted"]
    assert s.instances["valid_accepted"] > 300
