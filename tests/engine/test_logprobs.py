"""``SamplingParams(logprobs=k)``: each output token's log-probability equals log-softmax of transformers' own
logits for that position (the model's raw distribution), with and without speculation (chain and tree drafts that
are partly wrong: accepted draft tokens are scored by the verification pass's rows, the bonus token by its
parent's row). A stop string's cut drops the dropped tokens' logprobs too."""
from __future__ import annotations

import pytest
import torch

from leaplm import SamplingParams
from leaplm.engine import Engine
from leaplm.models.load import build_model

from ..engine_helpers import Oracle


def _reference_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V]: transformers' log-softmax at each output position."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(output) - 1], dim=-1)


@pytest.mark.parametrize("tree", [None, False, True], ids=["vanilla", "chain", "tree"])
def test_logprobs_equal_transformers_with_or_without_speculation(tree, tiny_model_dir):
    folder, hf = tiny_model_dir("llama-gqa-untied")
    engine = Engine(build_model(folder), eos_token_ids=[2])
    prompt = [5, 17, 33, 9, 71, 4, 18]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    vanilla = engine.start([prompt], [params]).run()[0]
    drafter = None if tree is None else Oracle([prompt + vanilla.output_ids], tree=tree)
    batch = engine.start([prompt], [params], drafter)
    batch.run()
    r = batch.rows[0]
    if drafter is not None:
        assert 0 < r.accepted < r.drafted   # some drafts accepted, some rejected: both paths are scored
    assert r.output_ids == vanilla.output_ids and len(r.logprobs) == len(r.output_ids)
    ref = _reference_logprobs(hf, prompt, r.output_ids)
    for i, (token, lp) in enumerate(zip(r.output_ids, r.logprobs)):
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=2e-4), i
        best = torch.topk(ref[i], 3)
        assert [t for t, _ in lp.top] == best.indices.tolist(), i
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=2e-4)
