"""Drafting through text with a draft whose tokenizer differs from the target's (universal assisted
decoding): the bridge maps faithfully, and greedy output stays identical to vanilla."""
from __future__ import annotations

import pytest
import torch

from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import DraftModel
from leaplm.speculative.drafters.token_bridge import TokenBridge
from leaplm.tokenizer import Tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
          "for i in range(10):\n    print(i * i)\n", "Speculative decoding drafts tokens; the target verifies them.",
          "café naïve — ünïcödé ✓ 数字"] * 20


def _tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>"))


@pytest.fixture(scope="module")
def tokenizers_pair():
    return _tokenizer(300), _tokenizer(420)


def test_the_bridge_maps_text_both_ways(tokenizers_pair):
    target, draft = tokenizers_pair
    assert target.hf.get_vocab() != draft.hf.get_vocab()
    bridge = TokenBridge(target, draft)
    text = "def add(a, b):\n    return a + b  # café ✓"
    ids = bridge.to_draft(target.encode(text))
    assert draft.decode(ids, skip_special_tokens=False) == text
    prefix, new = draft.encode("for i in"), draft.encode(" range(10):")
    assert target.decode(bridge.to_target(prefix, new, 50)) == " range(10):"
    assert len(bridge.to_target(prefix, new, 2)) == 2
    cut = draft.encode("✓")[:1]   # the first byte(s) of a multi-byte character only
    if draft.decode(cut).endswith("\ufffd"):
        assert bridge.to_target(prefix, cut, 5) == []


def _model(tmp_path, name, vocab_size, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(len(name))
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if "norm" in pname else p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return build_model(tmp_path / name)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_draft_with_another_tokenizer_keeps_the_output_exact(tokenizers_pair, tmp_path, temperature):
    target_tok, draft_tok = tokenizers_pair
    target = _model(tmp_path, "target", len(target_tok.hf), 3)
    draft = _model(tmp_path, "draft", len(draft_tok.hf), 1)
    drafter = DraftModel(draft, num_draft=4, confidence=0.0, tokenizer=draft_tok)
    drafter.bind(target, target_tok)
    assert drafter.bridge is not None
    engine = Engine(target)
    prompts = [target_tok.encode(t) for t in ("def add(a, b):", "The quick brown fox", "for i in range(10):\n")]
    params = [SamplingParams(temperature=temperature, seed=7, max_tokens=n, ignore_eos=True) for n in (20, 9, 16)]

    def run(d=None):
        return engine.start(prompts, params, d).run()

    vanilla, spec = run(), run(drafter)
    assert sum(r.drafted for r in spec) > 0
    if temperature == 0:
        assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
