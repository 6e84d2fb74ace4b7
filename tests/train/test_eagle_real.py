"""``leaplm train-drafter`` end to end on the real SmolLM2 (a short run: 12 prompts, 40 steps), then the head it
made drafts for SmolLM2 on the Spec-Bench prompts (first question of each category): greedy output identical to
vanilla with float and int8 weights, and some drafts accepted."""
from __future__ import annotations

import json

import pytest

from leaplm.sampling import SamplingParams

from ..speculative.test_real_exactness import _spec_bench_first_of_each_category


@pytest.fixture(scope="module")
def smollm_head(smollm_gguf, tmp_path_factory):
    from leaplm.cli import main

    out = tmp_path_factory.mktemp("smollm-eagle") / "head"
    code = main(["train-drafter", "-m", str(smollm_gguf), "--out", str(out), "--prompts", "12", "--max-tokens", "48",
                 "--steps", "40", "--seq-len", "64", "--batch", "4", "--draft-vocab", "4096"])
    assert code == 0
    return out


@pytest.mark.real
def test_train_drafter_writes_a_head_its_data_and_curves(smollm_head):
    config = json.loads((smollm_head / "config.json").read_text())
    assert config["method"] == "eagle" and config["draft_vocab_size"] == 4096
    assert config["training"]["steps"] == 40 and config["training"]["data_sequences"] == 12
    assert (smollm_head / "eagle.safetensors").is_file() and (smollm_head / "training.png").is_file()
    assert (smollm_head / "data" / "features.bin").stat().st_size > 12 * 48 * 576 * 2


@pytest.mark.real
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_head_is_exact_on_spec_bench_with_smollm2(smollm_gguf, smollm_head, quantization):
    from leaplm import LLM

    llm = LLM(str(smollm_gguf), quantization=quantization)
    prompts = _spec_bench_first_of_each_category()
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    out = llm.chat(prompts, params, use_tqdm=False, speculative={"method": "eagle", "path": str(smollm_head)})
    assert [o.token_ids for o in out] == ref
    assert sum(o.metrics["accepted"] for o in out) > 0
