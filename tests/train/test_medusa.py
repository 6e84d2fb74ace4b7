"""Medusa training mechanics on a tiny random Llama (seconds): the loss falls, the heads round-trip, a fresh head
guesses the next token itself (zero-initialised blocks), and the trained heads' drafts are verified exactly (greedy
output = vanilla) in float32 and int8, batched, with positive acceptance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leaplm import LLM, SamplingParams
from leaplm.errors import InvalidParamsError
from leaplm.speculative.drafters.medusa import Medusa, _best_first
from leaplm.speculative.heads.medusa import MedusaConfig, MedusaHeads
from leaplm.train.distill import Dataset, collect
from leaplm.train.loop import TrainConfig
from leaplm.train.medusa import train_medusa

from ..structured_helpers import CORPUS, build_tiny_llm, tiny_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model folder, data folder, heads folder, summary, prompts): a tiny target, its answers to 21 prompts and 3
    heads trained on them for 150 steps."""
    root = tmp_path_factory.mktemp("medusa")
    model_dir = build_tiny_llm(root / "model", tiny_tokenizer())
    llm = LLM(str(model_dir), quantization=None, prefix_caching=False)
    prompts = [llm.encode(t)[:12] for t in CORPUS] * 3
    collect(llm.engine, prompts, root / "data", max_tokens=40, model="tiny")
    cfg = TrainConfig(draft_vocab=200, seq_len=32, batch=4, heads=3, max_steps=150, eval_every=50, warmup=10,
                      lr=3e-3)
    summary = train_medusa(llm.model, Dataset(root / "data"), root / "heads", cfg, resume=False)
    return model_dir, root / "data", root / "heads", summary, prompts


def test_training_lowers_the_loss_and_saves_loadable_heads(trained):
    _, _, heads_dir, summary, _ = trained
    loss = json.loads((heads_dir / "train_state.json").read_text())["history"]["loss"]
    assert len(loss) == 150 and summary["steps"] == 150
    assert np.mean(loss[-20:]) < 0.7 * np.mean(loss[:20]), (np.mean(loss[:20]), np.mean(loss[-20:]))
    assert len(summary["eval_acc_by_depth"]) == 3 and summary["eval_acc_by_depth"][0] > 0.2
    assert (heads_dir / "training.png").stat().st_size > 1000
    heads = MedusaHeads.load(heads_dir)
    assert heads.config.num_heads == 3 and heads.config.training["steps"] == 150
    assert any(layer.weight.abs().sum() > 0 for head in heads.blocks for layer in head)


def test_untrained_heads_guess_the_next_token_itself(trained):
    """Zero-initialised blocks are the identity: every head reproduces the target's own next-token logits."""
    model_dir, *_ = trained
    llm = LLM(str(model_dir), quantization=None)
    c = llm.model.config
    heads = MedusaHeads(MedusaConfig(hidden_size=c.hidden_size, num_heads=2, vocab_size=c.vocab_size,
                                     draft_vocab_size=c.vocab_size))
    heads.draft_vocab.copy_(torch.arange(c.vocab_size))
    heads.attach(llm.model)
    f = torch.randn(3, c.hidden_size)
    from leaplm.speculative.heads.common import lm_weight

    want = f @ lm_weight(llm.model).float().T
    out = heads(f)
    assert out.shape == (2, 3, c.vocab_size)
    torch.testing.assert_close(out[1], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization, lookup", [(None, False), ("int8", False), (None, True)],
                         ids=["float", "int8", "lookup-first"])
def test_the_trained_heads_drafts_are_verified_exactly(trained, quantization, lookup):
    model_dir, _, heads_dir, _, prompts = trained
    vanilla = LLM(str(model_dir), quantization=quantization)
    spec = LLM(str(model_dir), quantization=quantization,
               speculative={"method": "medusa", "path": str(heads_dir), "quantization": quantization,
                            "node_cost": 0.0, "lookup": lookup})
    params = SamplingParams(temperature=0, max_tokens=40)
    want = vanilla.generate(prompts[:6], params, use_tqdm=False)
    got = spec.generate(prompts[:6], params, use_tqdm=False)   # six requests: one batched heads pass per step
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    accepted = sum(o.metrics["accepted"] for o in got)
    passes = sum(o.metrics["target_passes"] for o in got)
    assert accepted > 0 and passes < sum(len(o.token_ids) for o in want)
    assert isinstance(spec.drafter, Medusa) and spec.drafter.acceptance_by_depth()[0] > 0


def test_best_first_grows_the_likeliest_nodes_after_their_parents():
    lp = [[-0.1, -1.0], [-0.2, -3.0], [-0.5, -0.6]]
    ids = [[10, 11], [20, 21], [30, 31]]
    tokens, parents, scores = _best_first(lp, ids, 5)
    assert tokens == [10, 20, 30, 31, 11]
    assert parents == [-1, 0, 1, 1, -1]
    assert scores == pytest.approx([-0.1, -0.3, -0.8, -0.9, -1.0])
    assert all(p < i for i, p in enumerate(parents))


def test_bad_medusa_settings_and_folders_are_refused(trained, tmp_path):
    model_dir, _, heads_dir, _, _ = trained
    with pytest.raises(InvalidParamsError, match="not a Medusa head folder"):
        Medusa(str(tmp_path))
    with pytest.raises(InvalidParamsError, match="medusa needs a trained draft head"):
        LLM(str(model_dir), quantization=None, speculative="medusa")
    with pytest.raises(InvalidParamsError, match="medusa threshold must be a number in"):
        Medusa(str(heads_dir), typical=True, threshold=0)
    with pytest.raises(InvalidParamsError, match="medusa top_k must be an integer >= 1"):
        Medusa(str(heads_dir), top_k=0)
    with pytest.raises(InvalidParamsError, match=r"not an EAGLE head folder \(it holds a Medusa head\)"):
        LLM(str(model_dir), quantization=None, speculative={"method": "eagle", "path": str(heads_dir)})


def test_typical_acceptance_changes_sampling_only(trained):
    """Typical acceptance (lossy): greedy requests stay exact with ``typical=True``; sampled ones accept every draft
    token that is the target's argmax (``max p > alpha * exp(-H)`` always holds), where exact verification of the
    same drafts rejects some of them."""
    from leaplm.speculative.drafters.base import Draft, Drafter

    model_dir, _, heads_dir, _, prompts = trained
    vanilla = LLM(str(model_dir), quantization=None)

    class Oracle(Drafter):
        """Drafts the target's greedy continuation (computed by a second engine)."""
        name = "oracle"
        num_draft = 3

        def __init__(self, typical):
            self.typical = typical

        def propose(self, row, context, k):
            out = vanilla.generate([list(context)], SamplingParams(temperature=0, max_tokens=min(k, 3)),
                                   use_tqdm=False)
            return Draft(out[0].token_ids)

    greedy = SamplingParams(temperature=0, max_tokens=30)
    typical = LLM(str(model_dir), quantization=None,
                  speculative={"method": "medusa", "path": str(heads_dir), "quantization": None, "typical": True})
    assert [o.token_ids for o in typical.generate(prompts[:3], greedy, use_tqdm=False)] == \
        [o.token_ids for o in vanilla.generate(prompts[:3], greedy, use_tqdm=False)]
    sampled = SamplingParams(temperature=0.5, max_tokens=30, seed=1)
    counts = []
    for mode in ((0.09, 0.3), None):
        llm = LLM(str(model_dir), quantization=None, speculative=Oracle(mode))
        out = llm.generate(prompts[:4], sampled, use_tqdm=False)
        counts.append((sum(o.metrics["accepted"] for o in out), sum(o.metrics["drafted"] for o in out)))
    (typ_acc, typ_drafted), (exact_acc, exact_drafted) = counts
    assert typ_drafted > 0 and typ_acc == typ_drafted, counts
    assert exact_acc < exact_drafted, counts
