"""Every drafter on the real SmolLM2 model and the Spec-Bench prompts (first question of each of the 13
categories, first turn): greedy output token-identical to vanilla — with float weights and with int8
weights (where the whole decode step is batch-invariant). The Qwen 1.5B/0.5B pair is the slow test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from leaplm.bench.workloads import default_spec_bench_path
from leaplm.sampling import SamplingParams

MAX_TOKENS = 24


def _spec_bench_first_of_each_category() -> list[list[dict]]:
    path = default_spec_bench_path()
    if not path.is_file():
        pytest.skip(f"Spec-Bench questions not found at {path} (set LEAPLM_SPEC_BENCH)")
    seen, prompts = set(), []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if q["category"] not in seen:
            seen.add(q["category"])
            prompts.append([{"role": "user", "content": q["turns"][0]}])
    assert len(prompts) == 13
    return prompts


@pytest.mark.real
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_every_drafter_is_exact_on_spec_bench_with_smollm2(smollm_gguf, quantization):
    from leaplm import LLM

    llm = LLM(str(smollm_gguf), quantization=quantization, goodput=False)
    prompts = _spec_bench_first_of_each_category()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    docs = Path(__file__).resolve().parents[2] / "docs"
    chains = ["prompt_lookup", {"method": "copyspec"},
              # the model drafting for itself with int8 weights (a real, different-precision draft)
              {"method": "draft_model", "model": str(smollm_gguf), "lookup": True}]
    # token trees: full-size trees (no cost cut), a draft-model tree, a datastore of docs
    trees = [{"method": "recycling", "num_draft": 16, "node_cost": 0.0}, {"method": "aded", "node_cost": 0.0},
             {"method": "lookahead"},
             {"method": "draft_model", "model": str(smollm_gguf), "tree_top_k": 3, "confidence": 0.0},
             {"method": "retrieval", "corpus": str(docs)},
             {"method": "rasd", "model": str(smollm_gguf), "corpus": str(docs), "confidence": 0.0}]
    # int8 verifies each tree query with its own attention call (batch invariance): 6 categories there, to
    # keep the test short (rows are prefilled one by one, so the 13-prompt reference holds for any subset)
    tree_prompts, tree_ref = prompts, ref
    if quantization is not None:
        tree_prompts, tree_ref = prompts[:6], ref[:6]
    for spec in chains + trees:
        subset, expected = (tree_prompts, tree_ref) if spec in trees else (prompts, ref)
        out = llm.chat(subset, params, use_tqdm=False, speculative=spec)
        assert [o.token_ids for o in out] == expected, spec
        assert sum(o.metrics["accepted"] for o in out) > 0, spec


@pytest.mark.real
@pytest.mark.slow
def test_qwen_pair_is_exact_on_humaneval():
    from leaplm import LLM
    from leaplm.bench.workloads import humaneval_path, read_jsonl

    from ..conftest import models_dir

    target, draft = (models_dir() / f"qwen2.5-coder-{s}-instruct.Q4_K_M.gguf" for s in ("1.5b", "0.5b"))
    if not (target.exists() and draft.exists()):
        pytest.skip("Qwen2.5-Coder 1.5B/0.5B not fetched (leaplm models fetch qwen2.5-coder-1.5b-instruct ...)")
    llm = LLM(str(target), quantization="int8")
    problems = read_jsonl(humaneval_path())[:3]
    prompts = [[{"role": "user", "content": "Complete this Python function:\n" + p["prompt"]}] for p in problems]
    params = SamplingParams(temperature=0, max_tokens=64)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    out = llm.chat(prompts, params, use_tqdm=False, speculative={"method": "draft_model", "model": str(draft)})
    assert [o.token_ids for o in out] == ref
    assert sum(o.metrics["accepted"] for o in out) > 0


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_drafts_for_qwen_through_text(smollm_gguf):
    """Different tokenizers (49k vs 152k vocabularies): greedy output still identical."""
    from leaplm import LLM
    from leaplm.bench.workloads import humaneval_path, read_jsonl

    from ..conftest import models_dir

    target = models_dir() / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"
    if not target.exists():
        pytest.skip("Qwen2.5-Coder-0.5B not fetched (leaplm models fetch qwen2.5-coder-0.5b-instruct)")
    llm = LLM(str(target), quantization="int8")
    prompts = [[{"role": "user", "content": "Complete this Python function:\n" + p["prompt"]}]
               for p in read_jsonl(humaneval_path())[:2]]
    params = SamplingParams(temperature=0, max_tokens=48)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    spec = {"method": "draft_model", "model": str(smollm_gguf)}
    out = llm.chat(prompts, params, use_tqdm=False, speculative=spec)
    assert llm.drafter_for(spec).bridge is not None
    assert [o.token_ids for o in out] == ref
    assert sum(o.metrics["accepted"] for o in out) > 0
