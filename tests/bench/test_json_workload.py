"""``leaplm bench --workload json``: the built-in prompt + schema set, constrained contestants next to
unconstrained ones, exactness against ``vanilla+json``, and the structured-output metrics (mask time per token,
compile time, validity) - end to end on a tiny random llama saved with a tiny tokenizer (no checkpoint)."""
from __future__ import annotations

import json

import pytest

from leaplm.bench import BenchError, cli
from leaplm.bench.workloads import load_workload

from ..structured_helpers import SCHEMAS, build_tiny_llm, tiny_tokenizer


def test_builtin_json_workload_is_realistic_and_compiles(tmp_path):
    from leaplm.constrain import compile_constraint

    w = load_workload("json")
    assert w.name == "json" and len(w.samples) == 10 and w.constrained and w.needs_tokenizer
    assert {"extraction", "classification", "function_call", "generation"} <= set(w.categories)
    tok = tiny_tokenizer()
    for s in w.samples:
        schema = s.constraint["json_schema"]
        assert schema["type"] == "object" and json.dumps(schema) in s.turns[0]   # the prompt shows its schema
        compile_constraint(tok, json_schema=schema)
    assert len(load_workload("json", limit=1).samples) == 4


def test_constraint_fields_in_jsonl_rows(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text(json.dumps({"prompt": "x", "regex": "[a-z]+"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    w = load_workload(str(f))
    assert w.samples[0].constraint == {"regex": "[a-z]+"} and w.samples[1].constraint is None and w.constrained
    f.write_text(json.dumps({"prompt": "x", "regex": "a", "json_object": True}) + "\n")
    with pytest.raises(BenchError, match="at most one of"):
        load_workload(str(f))
    f.write_text(json.dumps({"prompt": "x", "json_schema": "not an object"}) + "\n")
    with pytest.raises(BenchError, match="json_schema must be an object"):
        load_workload(str(f))
    f.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(BenchError, match="has no sample with a json_schema"):
        load_workload(f"json:{f}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = build_tiny_llm(tmp_path_factory.mktemp("bench-json-model"), tiny_tokenizer())
    workload = tmp_path_factory.mktemp("bench-json") / "w.jsonl"
    rows = [{"id": f"s{i}", "category": cat, "prompt": f'{{"name": "Bob", "age": 12}} [1, 2, 3] {i}',
             "json_schema": SCHEMAS[name]}
            for i, (cat, name) in enumerate([("a", "person"), ("a", "consts"), ("b", "nested")])]
    workload.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("bench-json-out")
    code = cli.run(["--model", str(folder), "--workload", f"json:{workload}", "--max-tokens", "24",
                    "--methods", "prompt_lookup:min_ngram=1", "--jump-forward", "both", "--threads", "1",
                    "--warmup", "1", "--no-progress", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def test_constrained_contestants_are_exact_against_their_vanilla(run):
    code, out, res = run
    assert list(res["methods"]) == ["vanilla", "vanilla+json", "vanilla+json-nojf", "prompt_lookup:min_ngram=1",
                                    "prompt_lookup:min_ngram=1+json", "prompt_lookup:min_ngram=1+json-nojf"]
    assert code == 0 and res["not_exact"] == []
    for label, s in res["methods"].items():
        assert s["status"] == "ok" and s["n_ok"] == 3, (label, s["errors"])
        assert s["exact_match_vs_vanilla"] == 1.0, label
        x = s["structured"]
        assert x["constrained"] == ("+json" in label)
        if x["constrained"]:
            assert x["exact_reference"] == "vanilla" + label[label.index("+"):]
            assert x["masks"] > 0 and 0 < x["mask_us_p50"] <= x["mask_us_p99"]
            assert x["constraint_ms_per_token"] > 0 and x["speedup_vs_unconstrained"] > 0
            assert (x["forced_share"] > 0) == label.endswith("+json")
        else:
            assert x["masks"] == 0 and x["mask_us_p50"] is None and x["speedup_vs_unconstrained"] is None
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    constrained = [o for o in outputs if o["label"] == "vanilla+json"]
    assert all(o["text"].startswith("{") for o in constrained)


def test_compile_times_and_report(run):
    _, out, res = run
    st = res["structured"]
    assert set(st["compile_ms"]) == {"s0", "s1", "s2"} and st["compile_ms_p50"] > 0 and st["tokenizer_setup_s"] > 0
    assert st["jump_forward"] == "both"
    report = (out / "report.md").read_text()
    assert "## Structured output" in report and "mask p50 µs" in report and "vanilla+json-nojf" in report
    assert "--jump-forward" in res["command"]
