"""EAGLE training mechanics on a tiny random Llama (seconds): self-distilled data, loss falls, the saved head and the
resumable state round-trip, and the trained head's drafts are verified exactly (greedy output = vanilla) as a chain
and as a tree, with positive acceptance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leaplm import LLM, SamplingParams
from leaplm.errors import InvalidParamsError
from leaplm.speculative.heads.eagle import EagleHead
from leaplm.train.distill import Dataset, collect
from leaplm.train.eagle import TrainConfig, expected_accepted, train_eagle

from ..structured_helpers import CORPUS, build_tiny_llm, tiny_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model folder, data folder, head folder, summary, prompts): a tiny target, its answers to 21 prompts and a
    head trained on them for 150 steps."""
    root = tmp_path_factory.mktemp("eagle")
    model_dir = build_tiny_llm(root / "model", tiny_tokenizer())
    llm = LLM(str(model_dir), quantization=None, prefix_caching=False)
    prompts = [llm.encode(t)[:12] for t in CORPUS] * 3
    meta = collect(llm.engine, prompts, root / "data", max_tokens=40, model="tiny")
    cfg = TrainConfig(draft_vocab=200, seq_len=32, batch=4, unroll=2, max_steps=150, eval_every=50, warmup=10)
    summary = train_eagle(llm.model, Dataset(root / "data"), root / "head", cfg, resume=False)
    return model_dir, root / "data", root / "head", summary, prompts, meta


def test_the_data_holds_every_sequence_and_its_features(trained):
    model_dir, data_dir, _, _, prompts, meta = trained
    data = Dataset(data_dir)
    assert len(data.sequences) == len(prompts) == len(meta["sequences"])
    llm = LLM(str(model_dir), quantization=None)
    start, prompt_len, length = data.sequences[0]
    seq = data.tokens[start: start + length].tolist()
    assert seq[:prompt_len] == prompts[0]
    assert seq[prompt_len:] == llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=40))[0].token_ids
    # the features are the target's final hidden states of each token (the last one has none)
    ids = torch.tensor([seq[:-1]])
    from leaplm.cache.kv import KVCache
    from leaplm.models.transformer import _Step

    model = llm.model
    cache = KVCache.for_model(model.config, 1, len(seq), model.dtype, model.device)
    positions = torch.arange(len(seq) - 1)[None]
    with torch.inference_mode():
        _, hidden = model.layers_forward(ids, positions, cache, _Step(positions, model.config, len(seq) - 1, 0), None,
                                         torch.arange(len(seq) - 1)[None])
    got = torch.from_numpy(np.asarray(data.features[start: start + length - 1], dtype=np.float32))
    torch.testing.assert_close(got, hidden[0], atol=2e-3, rtol=2e-3)   # stored as float16
    assert not data.features[start + length - 1].any()


def test_training_lowers_the_loss_and_saves_a_loadable_head(trained):
    _, _, head_dir, summary, _, _ = trained
    state = json.loads((head_dir / "train_state.json").read_text())
    loss = state["history"]["loss"]
    assert len(loss) == 150 and summary["steps"] == 150
    assert np.mean(loss[-20:]) < 0.7 * np.mean(loss[:20]), (np.mean(loss[:20]), np.mean(loss[-20:]))
    assert summary["eval_acc_by_depth"][0] > 0.2
    assert (head_dir / "training.png").stat().st_size > 1000
    head = EagleHead.load(head_dir)
    assert head.config.training["steps"] == 150 and head.config.draft_vocab_size == 200


def test_training_resumes_from_its_state(trained, tmp_path):
    model_dir, data_dir, head_dir, _, _, _ = trained
    import shutil

    out = tmp_path / "head"
    shutil.copytree(head_dir, out)
    llm = LLM(str(model_dir), quantization=None)
    cfg = TrainConfig(draft_vocab=200, seq_len=32, batch=4, unroll=2, max_steps=160, eval_every=50, warmup=10)
    summary = train_eagle(llm.model, Dataset(data_dir), out, cfg, resume=True)
    state = json.loads((out / "train_state.json").read_text())
    assert summary["steps"] == 160 and len(state["history"]["loss"]) == 160   # 10 more steps, not 160


@pytest.mark.parametrize("shape", [{}, {"width": 1, "top_k": 1}], ids=["tree", "chain"])
def test_the_trained_head_drafts_are_verified_exactly(trained, shape):
    model_dir, _, head_dir, _, prompts, _ = trained
    vanilla = LLM(str(model_dir), quantization=None)
    spec = LLM(str(model_dir), quantization=None,
               speculative={"method": "eagle", "path": str(head_dir), "quantization": None, **shape})
    params = SamplingParams(temperature=0, max_tokens=40)
    want = vanilla.generate(prompts[:5], params, use_tqdm=False)
    got = spec.generate(prompts[:5], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    accepted = sum(o.metrics["accepted"] for o in got)
    passes = sum(o.metrics["target_passes"] for o in got)
    assert accepted > 0 and passes < sum(len(o.token_ids) for o in want)


def test_int8_head_is_exact_too(trained):
    model_dir, _, head_dir, _, prompts, _ = trained
    vanilla = LLM(str(model_dir), quantization="int8")
    spec = LLM(str(model_dir), quantization="int8", speculative={"method": "eagle", "path": str(head_dir)})
    params = SamplingParams(temperature=0, max_tokens=30)
    assert [o.token_ids for o in spec.generate(prompts[:3], params, use_tqdm=False)] == \
        [o.token_ids for o in vanilla.generate(prompts[:3], params, use_tqdm=False)]


def test_a_missing_or_foreign_head_is_refused(trained, tmp_path, tiny_model_dir):
    model_dir, _, head_dir, _, _, _ = trained
    with pytest.raises(InvalidParamsError, match="not an EAGLE head folder"):
        LLM(str(model_dir), quantization=None, speculative={"method": "eagle", "path": str(tmp_path)})
    with pytest.raises(InvalidParamsError, match="eagle needs a trained draft head"):
        LLM(str(model_dir), quantization=None, speculative="eagle")
    other = tiny_model_dir("llama-gqa-untied")[0]
    from leaplm.models.load import build_model

    head = EagleHead.load(head_dir)
    with pytest.raises(InvalidParamsError, match="trained for a target"):
        head.attach(build_model(other))


def test_expected_accepted_counts_the_bonus_token():
    assert expected_accepted([]) == 1.0
    assert expected_accepted([0.5, 0.5]) == pytest.approx(1.75)


def test_bad_training_settings_are_refused():
    with pytest.raises(InvalidParamsError, match="precision must be auto, bf16 or fp32"):
        TrainConfig(precision="fp8").check()
    with pytest.raises(InvalidParamsError, match="unroll must be an integer >= 1"):
        TrainConfig(unroll=0).check()
    assert TrainConfig(precision="fp32").use_bf16() is False and TrainConfig(precision="bf16").use_bf16() is True
