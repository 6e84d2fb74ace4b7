"""Engine-level sampling losslessness: with a drafter, the first generated tokens are distributed exactly
as vanilla sampling's, at temperature 0.7 with top-p 0.9, for prompt lookup (chains), Token Recycling (trees
and lookup chains), the draft model's deterministic tree mode and a compiled target.

How: a tiny random Llama over 16 tokens (``tiny_vocab_model``); 4096 rows of one prompt, 512 per
``Engine.start`` call, each row with its own seed (one prefill per row, the decode passes shared). The
counts of the first ``L`` generated tokens are compared with the exact distribution, computed from the
target's processed probabilities (``exact_joint``), pair of consecutive positions by pair of consecutive
positions (``chi_square.consecutive_pairs_p``; p-value > 0.001 split over the pairs). Every draw is seeded,
so a run is deterministic.

Power: the prompt is the target's own greedy continuation, so drafts copy what the target tends to say
and are accepted 35-60% of the time; each test asserts how much was drafted and accepted, since drafts
never (or always) accepted would hide a biased acceptance rule. Measured when these were written, with
bugs planted in speculative/verify.py: a chain verifier that accepts with ``min(1, 1.11 p / q)`` (an 11%
acceptance inflation) fails the prompt lookup, recycling and compiled tests, a tree verifier doing so the
draft-model tree test (p-values of 1e-6 or less; recycling drafts too few trees to see that one);
verifying against the untempered softmax, keeping a rejected token in the resampling distribution or
drawing the bonus token from the wrong row fails all four; and EOS ending a row despite ``ignore_eos``
fails them too (``sample_joint``).
"""
from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams, probabilities

from .chi_square import ALPHA, consecutive_pairs_p

pytestmark = pytest.mark.usefixtures("single_thread")   # tests/speculative/conftest.py

V = 16          # vocabulary of the tiny models here
EOS = 1         # their EOS id: drawn 3-8% of the time after the first token; PARAMS ignore it (every row runs L tokens)
PARAMS = SamplingParams(temperature=0.7, top_p=0.9, ignore_eos=True)


def tiny_vocab_model(folder, name: str, vocab: int = V, scale: float = 0.25, layers: int = 2):
    """A random Llama over ``vocab`` tokens saved under ``folder / name`` and loaded by leaplm (float32).
    ``scale``: the weights' standard deviation; 0.25 makes next-token distributions peaked enough that a
    draft is often likely, yet several tokens survive top-p = 0.9 at temperature 0.7."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(zlib.crc32(name.encode()))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=EOS)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in pname else p.normal_(0, scale)
    path = folder / name
    model.save_pretrained(path, safe_serialization=True)
    return build_model(path)


def next_probs(model, prefixes: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """The processed next-token distribution after each prefix (all of one length), ``[len(prefixes), V]``."""
    ids = torch.tensor(prefixes)
    n, t = ids.shape
    cache = KVCache.for_model(model.config, n, t, torch.float32, "cpu")
    logits = model(ids, torch.arange(t)[None].expand(n, -1), cache)[:, -1]
    return probabilities(logits, params, None)


def exact_joint(model, prompt: list[int], params: SamplingParams, length: int) -> torch.Tensor:
    """P(first ``length`` generated tokens) under vanilla sampling, ``[V] * length`` float64 (penalties off:
    each position's distribution depends on the prefix only). Zero-probability prefixes are not expanded."""
    vocab = model.config.vocab_size
    joint = next_probs(model, [prompt], params)[0].double()
    for depth in range(1, length):
        flat = joint.reshape(-1)
        live = flat.nonzero().flatten().tolist()
        prefixes = [prompt + list(_digits(i, vocab, depth)) for i in live]
        probs = next_probs(model, prefixes, params).double()
        out = torch.zeros(flat.numel(), vocab, dtype=torch.float64)
        out[live] = flat[live, None] * probs
        joint = out.reshape([vocab] * (depth + 1))
    return joint


def _digits(index: int, base: int, count: int) -> tuple[int, ...]:
    out = []
    for _ in range(count):
        index, d = divmod(index, base)
        out.append(d)
    return tuple(reversed(out))


def greedy_prompt(model, start: list[int], length: int) -> list[int]:
    """``start`` followed by the model's own greedy continuation, ``length`` tokens in all: text the
    target tends to repeat, so copy drafters find matches and their drafts are likely."""
    engine = Engine(model)
    row = engine.start([start], [SamplingParams(temperature=0, max_tokens=length - len(start), ignore_eos=True)]).run()[0]
    return start + row.output_ids


def sample_joint(engine: Engine, prompt: list[int], params: SamplingParams, length: int, n: int, drafter=None,
                 rows: int = 512, seed: int = 0) -> tuple[torch.Tensor, int, int]:
    """Generate ``length`` tokens for ``n`` rows of ``prompt`` (row i seeded ``seed + i``, ``rows`` per
    batch; every row must run to ``length``: ``params.ignore_eos``); returns (counts of the token tuples
    ``[V] * length``, draft tokens proposed, accepted)."""
    vocab = engine.config.vocab_size
    counts = torch.zeros([vocab] * length, dtype=torch.float64)
    drafted = accepted = 0
    for lo in range(0, n, rows):
        ps = [replace(params, max_tokens=length, seed=seed + i) for i in range(lo, min(n, lo + rows))]
        for r in engine.start([prompt] * len(ps), ps, drafter).run():
            assert len(r.output_ids) == length, f"a row ended early ({r.finish_reason}): {r.output_ids}"
            counts[tuple(r.output_ids)] += 1
            drafted, accepted = drafted + r.drafted, accepted + r.accepted
    return counts, drafted, accepted


class Recorder:
    """Wraps a drafter, counting the proposals that are trees with siblings (two nodes with one parent)."""

    def __init__(self, drafter) -> None:
        self.inner, self.branched = drafter, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, row, context, k):
        draft = self.inner.propose(row, context, k)
        if draft.parents is not None and len(set(draft.parents)) < len(draft.parents):
            self.branched += 1
        return draft


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(folder, model, prompt): the tiny target and a prompt of its own greedy continuation."""
    folder = tmp_path_factory.mktemp("distribution")
    model = tiny_vocab_model(folder, "target")
    return folder / "target", model, greedy_prompt(model, [3, 4], 16)


def check_distribution(model, prompt, drafter, length: int, n: int = 4096, *, min_drafted: float, accept=(0.3, 0.9)):
    """Sample ``n`` rows of ``length`` tokens through ``drafter`` and test every consecutive pair of positions
    against vanilla sampling (p-value > ALPHA / pairs each); the drafts must be tested for real: at least
    ``min_drafted`` draft tokens per row, and an acceptance rate within ``accept`` (a biased acceptance
    rule shows only where drafts are sometimes accepted and sometimes not)."""
    counts, drafted, accepted = sample_joint(Engine(model, eos_token_ids=[EOS]), prompt, PARAMS, length, n, drafter)
    assert drafted >= min_drafted * n and accept[0] <= accepted / drafted <= accept[1], (
        f"the drafts do not test verification enough: {drafted} drafted for {n} rows, {accepted} accepted")
    pvalues = consecutive_pairs_p(counts, exact_joint(model, prompt, PARAMS, length))
    assert min(pvalues) > ALPHA / len(pvalues), f"p-values of the consecutive pairs {pvalues}"


def test_prompt_lookup_keeps_the_distribution(target):
    """Chains copied from the prompt; the first drafted position is the second token."""
    from leaplm.speculative.drafters import PromptLookup

    _, model, prompt = target
    check_distribution(model, prompt, PromptLookup(num_draft=2, min_ngram=1), 3, min_drafted=0.5)


def test_recycled_token_trees_keep_the_distribution(target):
    """Token Recycling's trees (siblings verified by recursive rejection sampling; about a quarter of its
    drafts) and its lookup chains; 5 tokens, so the first draft may hold 3 nodes."""
    from leaplm.speculative.drafters import TokenRecycling

    _, model, prompt = target
    drafter = Recorder(TokenRecycling(num_draft=6, node_cost=0.0))
    check_distribution(model, prompt, drafter, 5, min_drafted=1.0)
    assert drafter.branched >= 400, f"only {drafter.branched} drafts had siblings"


def test_draft_model_token_trees_keep_the_distribution(target):
    """The draft model's deterministic tree mode, drafting with the target's own weights: each first draft
    is the target's two likeliest tokens as siblings (its greedy token, then the next best), so recursive
    rejection sampling decides between them every time."""
    from leaplm.speculative.drafters import DraftModel

    folder, model, prompt = target
    drafter = DraftModel(build_model(folder), num_draft=1, adaptive=False, confidence=0.0, quantization=None,
                         tree_top_k=2, tree_extra=1, tree_min_prob=0.0, node_cost=0.0)
    drafter.bind(model)
    drafter = Recorder(drafter)
    check_distribution(model, prompt, drafter, 4, min_drafted=1.5)
    assert drafter.branched >= 4096, f"only {drafter.branched} drafts had siblings"


def test_eagle_head_trees_keep_the_distribution(target, tmp_path):
    """A trained EAGLE head's trees (deterministic siblings: the head's likeliest tokens, verified by recursive
    rejection sampling with one-hot q): a head trained for seconds on the target's own greedy answers."""
    from leaplm.engine import LLMEngine
    from leaplm.speculative.drafters import Eagle
    from leaplm.train.distill import Dataset, collect
    from leaplm.train.eagle import TrainConfig, train_eagle

    _, model, prompt = target
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, V, (6,), generator=gen).tolist() for _ in range(24)] + [prompt]
    collect(LLMEngine(model, eos_token_ids=[EOS], prefix_caching=False), prompts, tmp_path / "data", max_tokens=24)
    train_eagle(model, Dataset(tmp_path / "data"), tmp_path / "head",
                TrainConfig(draft_vocab=V, seq_len=16, batch=4, unroll=2, max_steps=120, warmup=10, eval_every=60,
                            precision="fp32"))
    eagle = Eagle(str(tmp_path / "head"), num_draft=3, depth=2, top_k=2, width=1, quantization=None, node_cost=0.0,
                  min_prob=0.0)
    eagle.bind(model)
    drafter = Recorder(eagle)
    check_distribution(model, prompt, drafter, 4, min_drafted=1.0, accept=(0.1, 0.9))
    assert drafter.branched >= 500, f"only {drafter.branched} drafts had siblings"


def test_medusa_head_trees_keep_the_distribution(target, tmp_path):
    """Trained Medusa heads' trees (the heads' top-2 as deterministic siblings at each depth, verified by recursive
    rejection sampling with one-hot q; two heads, so a 3-node draft branches): heads trained for seconds on the
    target's own greedy answers."""
    from leaplm.engine import LLMEngine
    from leaplm.speculative.drafters import Medusa
    from leaplm.train.distill import Dataset, collect
    from leaplm.train.loop import TrainConfig
    from leaplm.train.medusa import train_medusa

    _, model, prompt = target
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, V, (6,), generator=gen).tolist() for _ in range(24)] + [prompt]
    collect(LLMEngine(model, eos_token_ids=[EOS], prefix_caching=False), prompts, tmp_path / "data", max_tokens=24)
    train_medusa(model, Dataset(tmp_path / "data"), tmp_path / "heads",
                 TrainConfig(draft_vocab=V, seq_len=16, batch=4, heads=2, max_steps=120, warmup=10, eval_every=60,
                             lr=3e-3, precision="fp32"))
    medusa = Medusa(str(tmp_path / "heads"), num_draft=3, top_k=2, quantization=None, node_cost=0.0)
    medusa.bind(model)
    drafter = Recorder(medusa)
    check_distribution(model, prompt, drafter, 5, min_drafted=1.0, accept=(0.05, 0.9))   # 3-node first drafts
    assert drafter.branched >= 500, f"only {drafter.branched} drafts had siblings"


@pytest.mark.slow   # ~30 s with a cold inductor cache (compiling is ~15 s of it), ~17 s warm, on 2 busy cores
def test_a_compiled_target_keeps_the_distribution(target):
    """Decode and verify passes through the compiled step (``model.compile()``): Token Recycling's trees and
    chains, as in the eager test."""
    from leaplm.speculative.drafters import TokenRecycling

    folder, _, prompt = target
    model = build_model(folder)
    model.compile()
    drafter = Recorder(TokenRecycling(num_draft=6, node_cost=0.0))
    check_distribution(model, prompt, drafter, 5, min_drafted=1.0)
    assert drafter.branched >= 400, f"only {drafter.branched} drafts had siblings"
