"""``leaplm generate --json-schema FILE | --regex R | --grammar FILE | --json-object`` end to end (in-process,
``leaplm.cli.main``), and one-line errors with exit status 2 for bad schemas (unreadable, not JSON, unsupported
feature, two constraints at once) — found before the model loads where the model is not needed."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from .structured_helpers import build_tiny_llm, tiny_tokenizer
from .test_cli import leaplm, no_model_load  # noqa: F401 - a fixture

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}},
          "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("cli-structured"), tiny_tokenizer())


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    return path


@pytest.mark.parametrize("args, message", [
    (["--json-schema", "/no/such/schema.json"], "--json-schema: cannot read '/no/such/schema.json'"),
    (["--grammar", "/no/such/grammar.lark"], "--grammar: cannot read"),
    (["--regex", "a+", "--json-object"], "at most one of json_schema, regex, grammar, json_object=True"),
    (["--regex", "(a"], "invalid regex for structured output"),
])
def test_bad_structured_flags_are_one_line_exit_2(args, message, no_model_load):
    out = leaplm("generate", *args, "hi")
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr and out.stderr.startswith("error:")


def test_bad_schemas_fail_before_the_load(tmp_path, no_model_load):
    bad = tmp_path / "bad.json"
    bad.write_text("{'type': 'object'}")
    out = leaplm("generate", "--json-schema", str(bad), "hi")
    assert out.returncode == 2 and "is not valid JSON" in out.stderr and "Traceback" not in out.stderr
    unsupported = tmp_path / "not.json"
    unsupported.write_text(json.dumps({"type": "object", "not": {"required": ["a"]}}))
    out = leaplm("generate", "--json-schema", str(unsupported), "hi")
    assert out.returncode == 2 and '"not"' in out.stderr and out.stderr.startswith("error:")


def test_generate_json_schema_on_a_tiny_model(tiny_dir, schema_file, tmp_path):
    """SCHEMA bounds its string and its number, and the greedy tiny model's instance fits in 80 tokens (56):
    it completes (finish reason stop, exit 0) and validates."""
    out = leaplm("generate", "--model", str(tiny_dir), "--max-tokens", "80", "--json-schema", str(schema_file), "hi")
    assert out.returncode == 0, out.stderr
    assert "(stop)" in out.stderr and "forced by the grammar" in out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    out = leaplm("generate", "--model", str(tiny_dir), "--max-tokens", "12", "--regex", "[0-9]{3}-[a-z]{2}", "hi")
    assert out.returncode == 0 and re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.stdout.strip()), out.stdout
    grammar = tmp_path / "yesno.lark"
    grammar.write_text('start: "yes" | "no"\n')
    out = leaplm("generate", "--model", str(tiny_dir), "--grammar", str(grammar), "--stream", "hi")
    assert out.returncode == 0 and out.stdout.strip() in ("yes", "no"), out.stderr


@pytest.mark.real
def test_generate_json_schema_with_smollm2(smollm_gguf, schema_file):
    out = leaplm("generate", "--model", str(smollm_gguf), "--chat", "--max-tokens", "60", "--json-schema",
                 str(schema_file), "What is the largest city of Japan and its population? Answer in JSON.")
    assert out.returncode == 0, out.stderr
    assert "(stop)" in out.stderr
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
