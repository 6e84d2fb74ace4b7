"""``check_constraint``: the tokenizer-free check the CLI runs before loading a model refuses what
``compile_constraint`` refuses for the same reason, with the same message, and accepts what it compiles."""
from __future__ import annotations

import pytest

from leaplm.constrain import check_constraint, compile_constraint
from leaplm.errors import InvalidConstraintError

from ..structured_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("kwargs, needle", [
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json_schema": {"type": "strin"}}, "strin"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": False}, "matches nothing"),
    ({"regex": "[a-"}, "unclosed character class"),
    ({"grammar": "start: nowhere\n"}, 'unknown name: "nowhere"'),
    ({"grammar": "root ::= missing\n"}, "not convertible from GBNF: Rule 'missing' not found"),
    ({"regex": "a", "grammar": "start: \"a\"\n"}, "give exactly one of"),
])
def test_same_refusal_as_compiling(tokenizer, kwargs, needle):
    with pytest.raises(InvalidConstraintError) as checked:
        check_constraint(**kwargs)
    with pytest.raises(InvalidConstraintError) as compiled:
        compile_constraint(tokenizer, **kwargs)
    assert needle in str(checked.value)
    assert str(checked.value) == str(compiled.value)
    assert str(checked.value).count("for structured output") <= 1   # the prefix is added once


@pytest.mark.parametrize("kwargs", [
    {"json_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    {"json_schema": True}, {"json_object": True}, {"regex": "[0-9]{3}"},
    {"grammar": 'start: "yes" | "no"\n'}, {"grammar": 'root ::= "yes" | "no"\n'},
])
def test_accepts_what_compiles(tokenizer, kwargs):
    check_constraint(**kwargs)
    assert compile_constraint(tokenizer, **kwargs) is not None
