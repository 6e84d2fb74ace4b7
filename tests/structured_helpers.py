"""Shared pieces of the structured-output tests: a tiny byte-level BPE tokenizer, a tiny random llama saved
with it (an HF folder ``LLM`` can load: no real checkpoint needed), a random-logits stub model, and drafters
that propose grammar-breaking tokens on purpose."""
from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

from leaplm.speculative.drafters import Draft, Drafter
from leaplm.tokenizer import Tokenizer

VOCAB = 320          # the tiny model's logits width: > the tokenizer's ~300 ids (ids past it are padding)
EOS = 0              # "<eos>"

CORPUS = ['{"name": "Bob", "age": 12, "tags": ["a", "b"]}', '{"id": 7, "ok": true, "score": 0.5}',
          '[1, 2, 3]', 'hello world 123 abc', '{"city": "Paris", "country": "France", "zip": "75001"}',
          'null false true', '{"items": [{"x": 1}, {"x": 2}]}']

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}},
                                             "required": ["x"], "additionalProperties": False},
                  "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"}}, "required": ["items", "ok"], "additionalProperties": False},
    "any-of": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 6}, {"type": "null"}]},
    "consts": {"type": "object", "properties": {
        "version": {"const": "1.0.0"}, "kind": {"enum": ["city"]}, "city": {"type": "string", "maxLength": 8},
        "country": {"const": "France"}},
        "required": ["version", "kind", "city", "country"], "additionalProperties": False},
}


def tiny_tokenizer(corpus: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE (~300 ids, EOS ``<eos>`` = 0) trained in-process on a little JSON (or ``corpus``)."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = RustTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator((corpus or CORPUS) * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")
    assert hf.eos_token_id == EOS and len(hf) < VOCAB
    return Tokenizer(hf, [EOS])


def build_tiny_llm(folder: Path, tokenizer: Tokenizer, seed: str = "structured") -> Path:
    """Save a tiny random llama (``VOCAB`` logits, EOS 0) and ``tokenizer`` into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=EOS, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(zlib.crc32(seed.encode()))
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.hf.save_pretrained(folder)
    return folder


class RandomLogitsModel:
    """A stub target: logits depend only on (token, position) through fixed random tables, so they are the
    same whether a token is fed alone, in a chain or in a tree. ``eos_bias`` is added to the EOS logit."""

    def __init__(self, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0, eos_bias: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * scale      # [V, V]: next-token logits per token
        self.by_pos = torch.randn(4096, vocab, generator=g) * scale      # [P, V]
        self.table[:, EOS] += eos_bias
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096, num_layers=1,
                                      num_kv_heads=1, head_dim=1, layer_types=["full"], sliding_window=None)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.compiled = None
        self.passes = 0

    def forward_paged(self, tokens, positions, pool, step, logit_index=None, compiled=False, hidden_index=None):
        """The engine's pass: ``tokens``, ``positions [N]`` -> logits ``[K, V]`` of ``logit_index`` (and, with
        ``hidden_index``, stand-in hidden states: the logits rows)."""
        self.passes += 1
        logits = self.table[tokens] + self.by_pos[positions]             # [N, V]
        out = logits if logit_index is None else logits[logit_index]
        return out if hidden_index is None else (out, logits[hidden_index])

    def __call__(self, tokens, positions, cache, *, logit_index=None, kv_len=None, contiguous_start=None, tree=None):
        self.passes += 1
        logits = self.table[tokens] + self.by_pos[positions]             # [B, T, V]
        if logit_index is not None:
            logits = torch.gather(logits, 1, logit_index[:, :, None].expand(-1, -1, logits.shape[-1]))
        return logits


class RandomDrafter(Drafter):
    """Proposes random ids from the whole vocabulary (mostly grammar-breaking), as a chain or a tree, plus
    the target-independent ``hint`` continuation when given (so something is accepted now and then)."""

    name = "random"

    def __init__(self, num_draft: int = 6, tree: bool = False, seed: int = 0, hint: list[int] | None = None) -> None:
        self.num_draft, self.tree, self.hint = num_draft, tree, hint
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, row, context, k):
        tokens = torch.randint(0, VOCAB, (k,), generator=self.g).tolist()
        if not self.tree:
            return Draft(tokens)
        parents, seen = [], set()
        for i, t in enumerate(tokens):
            p = int(torch.randint(-1, i, (1,), generator=self.g)) if i else -1
            while (p, t) in seen:   # siblings must differ
                t = (t + 1) % VOCAB
            seen.add((p, t))
            tokens[i] = t
            parents.append(p)
        return Draft(tokens, parents=parents)


class OracleDrafter(Drafter):
    """Drafts the continuation of a known output (e.g. vanilla's) behind a prompt, as a chain, or as a tree
    whose first branch is a decoy and whose second is the truth. Every accepted token is then right."""

    name = "oracle"

    def __init__(self, outputs: dict[int, list[int]], prompt_lens: dict[int, int], num_draft: int = 5,
                 tree: bool = False, decoy: int = 3) -> None:
        self.outputs, self.prompt_lens = outputs, prompt_lens
        self.num_draft, self.tree, self.decoy = num_draft, tree, decoy
        self._index: dict[int, int] = {}   # the engine's request id -> the batch row it started as (start order)

    def start(self, row, params):
        self._index.setdefault(row, len(self._index))

    def propose(self, row, context, k):
        row = self._index.get(row, row)
        done = len(context) - self.prompt_lens[row]
        truth = self.outputs[row][done: done + k]
        if not self.tree:
            return Draft(truth)
        if not truth:
            return Draft([])
        decoy = self.decoy if self.decoy != truth[0] else self.decoy + 1
        tokens, parents = [decoy], [-1]
        for i, t in enumerate(truth[: k - 1]):
            tokens.append(t)
            parents.append(-1 if i == 0 else len(tokens) - 2)
        return Draft(tokens, parents=parents)
