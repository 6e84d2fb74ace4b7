"""Kangaroo mechanics on a tiny random Llama (seconds): the shallow states are the target's own layer-L hidden states
(checked against transformers), training lowers the loss, the adapter round-trips without the target's weights, and
its drafts are verified exactly (greedy output = vanilla) in float32 and int8, with positive acceptance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leaplm import LLM, SamplingParams
from leaplm.errors import InvalidParamsError
from leaplm.speculative.drafters.kangaroo import Kangaroo
from leaplm.speculative.heads.kangaroo import KangarooAdapter
from leaplm.train.distill import Dataset, collect
from leaplm.train.kangaroo import shallow_states, train_kangaroo
from leaplm.train.loop import TrainConfig

from ..structured_helpers import CORPUS, build_tiny_llm, tiny_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model folder, data folder, adapter folder, summary, prompts): a tiny 2-layer target, its answers to 21
    prompts and an adapter after layer 1 trained on them for 150 steps."""
    root = tmp_path_factory.mktemp("kangaroo")
    model_dir = build_tiny_llm(root / "model", tiny_tokenizer())
    llm = LLM(str(model_dir), quantization=None, prefix_caching=False)
    prompts = [llm.encode(t)[:12] for t in CORPUS] * 3
    collect(llm.engine, prompts, root / "data", max_tokens=40, model="tiny")
    cfg = TrainConfig(draft_vocab=200, seq_len=32, batch=4, max_steps=150, eval_every=50, warmup=10, lr=3e-3)
    summary = train_kangaroo(llm.model, Dataset(root / "data"), root / "adapter", cfg, exit_layer=1, resume=False)
    return model_dir, root / "data", root / "adapter", summary, prompts


def test_shallow_states_are_the_targets_layer_states(trained):
    model_dir, data_dir, adapter_dir, _, _ = trained
    from transformers import AutoModelForCausalLM

    llm = LLM(str(model_dir), quantization=None)
    adapter = KangarooAdapter.load(adapter_dir)
    adapter.attach(llm.model)
    data = Dataset(data_dir)
    states = shallow_states(adapter, data, batch=3)   # sequences of different lengths share padded batches
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    for start, _, length in data.sequences[:4]:
        ids = torch.from_numpy(np.asarray(data.tokens[start: start + length], dtype=np.int64))[None]
        with torch.no_grad():
            want = hf(ids, output_hidden_states=True).hidden_states[1][0]   # after the first decoder layer
        got = torch.from_numpy(states[start: start + length].astype(np.float32))
        torch.testing.assert_close(got, want, atol=3e-3, rtol=3e-3)         # stored as float16


def test_training_lowers_the_loss_and_saves_the_adapter_alone(trained):
    model_dir, _, adapter_dir, summary, _ = trained
    loss = json.loads((adapter_dir / "train_state.json").read_text())["history"]["loss"]
    assert len(loss) == 150 and summary["steps"] == 150 and summary["exit_layer"] == 1
    assert np.mean(loss[-20:]) < 0.7 * np.mean(loss[:20]), (np.mean(loss[:20]), np.mean(loss[-20:]))
    assert summary["eval_acc_by_depth"][0] > 0.2
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "kangaroo.safetensors"))
    assert not any(k.startswith("_target") or "blocks" in k for k in saved), sorted(saved)   # no target weights
    assert KangarooAdapter.load(adapter_dir).config.exit_layer == 1


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_adapters_drafts_are_verified_exactly(trained, quantization):
    model_dir, _, adapter_dir, _, prompts = trained
    vanilla = LLM(str(model_dir), quantization=quantization)
    spec = LLM(str(model_dir), quantization=quantization,
               speculative={"method": "kangaroo", "path": str(adapter_dir), "quantization": quantization,
                            "confidence": 0.0, "num_draft": 4})
    params = SamplingParams(temperature=0, max_tokens=40)
    want = vanilla.generate(prompts[:4], params, use_tqdm=False)
    got = spec.generate(prompts[:4], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    accepted = sum(o.metrics["accepted"] for o in got)
    passes = sum(o.metrics["target_passes"] for o in got)
    assert accepted > 0 and passes < sum(len(o.token_ids) for o in want)
    assert spec.drafter.acceptance_by_depth()[0] > 0


def test_the_confidence_stop_shortens_drafts(trained):
    model_dir, _, adapter_dir, _, prompts = trained
    drafted = []
    for confidence in (0.0, 0.9):
        llm = LLM(str(model_dir), quantization=None,
                  speculative={"method": "kangaroo", "path": str(adapter_dir), "quantization": None,
                               "confidence": confidence, "num_draft": 4})
        out = llm.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
        drafted.append(sum(o.metrics["drafted"] for o in out))
    assert drafted[1] < drafted[0], drafted


def test_bad_kangaroo_settings_are_refused(trained, tmp_path):
    model_dir, _, adapter_dir, _, _ = trained
    with pytest.raises(InvalidParamsError, match="not a Kangaroo head folder"):
        Kangaroo(str(tmp_path))
    with pytest.raises(InvalidParamsError, match="kangaroo confidence must be a number in"):
        Kangaroo(str(adapter_dir), confidence=1.5)
    with pytest.raises(InvalidParamsError, match="kangaroo needs a trained draft head"):
        LLM(str(model_dir), quantization=None, speculative="kangaroo")
    from leaplm.speculative.heads.kangaroo import KangarooConfig

    with pytest.raises(InvalidParamsError, match="exit layer must be in"):
        KangarooConfig.for_target(LLM(str(model_dir), quantization=None).model.config, 2, 10)
