"""``leaplm train-drafter`` end to end on the real SmolLM2 (a short run: 12 prompts, 40 steps; Medusa and Kangaroo
train on the EAGLE run's data), then each head drafts for SmolLM2 on the Spec-Bench prompts (first question of each
category): greedy output identical to vanilla with float and int8 weights, and some drafts accepted."""
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


@pytest.fixture(scope="module")
def smollm_heads(smollm_gguf, smollm_head):
    """{method: folder}: the EAGLE head, and Medusa heads and a Kangaroo adapter trained on its data."""
    from leaplm.cli import main

    heads = {"eagle": smollm_head}
    for method, extra in (("medusa", ["--heads", "3"]), ("kangaroo", ["--exit-layer", "2"])):
        out = smollm_head.parent / method
        code = main(["train-drafter", "-m", str(smollm_gguf), "--method", method, "--out", str(out),
                     "--data", str(smollm_head / "data"), "--prompts", "12", "--steps", "40", "--seq-len", "64",
                     "--batch", "4", "--draft-vocab", "4096", *extra])
        assert code == 0
        config = json.loads((out / "config.json").read_text())
        assert config["method"] == method and config["training"]["steps"] == 40
        heads[method] = out
    return heads


@pytest.mark.real
def test_train_drafter_writes_a_head_its_data_and_curves(smollm_head):
    config = json.loads((smollm_head / "config.json").read_text())
    assert config["method"] == "eagle" and config["draft_vocab_size"] == 4096
    assert config["training"]["steps"] == 40 and config["training"]["data_sequences"] == 12
    assert (smollm_head / "eagle.safetensors").is_file() and (smollm_head / "training.png").is_file()
    assert (smollm_head / "data" / "features.bin").stat().st_size > 12 * 48 * 576 * 2


@pytest.mark.real
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_heads_are_exact_on_spec_bench_with_smollm2(smollm_gguf, smollm_heads, quantization):
    from leaplm import LLM

    llm = LLM(str(smollm_gguf), quantization=quantization, goodput=False)   # weak heads keep drafting
    prompts = _spec_bench_first_of_each_category()
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    for method, folder in smollm_heads.items():
        out = llm.chat(prompts, params, use_tqdm=False, speculative={"method": method, "path": str(folder)})
        assert [o.token_ids for o in out] == ref, method
        assert sum(o.metrics["drafted"] for o in out) > 0, method


@pytest.mark.real
def test_the_heads_draft_what_they_learnt(smollm_gguf, smollm_heads):
    """Heads trained for 40 steps on 12 answers cannot guess new text yet, but they have learnt their own data: on
    the training prompts (greedy, so the same answers) some of their drafts are accepted. Goodput sizing is off, so
    a weak drafter keeps drafting."""
    from leaplm import LLM
    from leaplm.train.prompts import training_prompts

    llm = LLM(str(smollm_gguf), goodput=False)
    prompts = [p["messages"] for p in training_prompts(12)[:6]]
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = [o.token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    for method, folder in smollm_heads.items():
        extra = {"confidence": 0.0} if method == "kangaroo" else {"node_cost": 0.0}   # draft whatever it guesses
        spec = {"method": method, "path": str(folder), **extra}
        out = llm.chat(prompts, params, use_tqdm=False, speculative=spec)
        assert [o.token_ids for o in out] == ref, method
        assert sum(o.metrics["accepted"] for o in out) > 0, method
