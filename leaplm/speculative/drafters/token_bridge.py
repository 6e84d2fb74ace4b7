"""Drafting across tokenizers (universal assisted decoding, Timor et al. 2025): a draft model whose
tokenizer differs from the target's drafts in *text*.

``TokenBridge(target_tok, draft_tok)``:
- ``to_draft(context) -> list[int]``: the target context (ids) as text, re-tokenized by the draft's
  tokenizer (special tokens kept as text, e.g. ChatML markers). The draft's KV cache then keeps the
  longest common prefix with what it saw before, so re-tokenization at the boundary only costs the
  last few tokens.
- ``to_target(draft_prefix, draft_new, k) -> list[int]``: the text the draft added (decoded in
  context, so leading spaces survive), cut before an incomplete UTF-8 character, re-tokenized by the
  target's tokenizer, at most ``k`` ids.

Lossless: the target verifies target ids. The proposals carry no ``q`` (``Draft.probs`` is None):
the one-hot rule — accept x with probability p(x), else draw from p without x — gives exactly the
target distribution for *any* draft distribution independent of the target's randomness, so
sampled requests stay exact too (only less is accepted than with a known q).
Cost: one decode + one encode of the context per step (Rust tokenizers: ~1 ms per 1000 tokens).
"""
from __future__ import annotations

from typing import Sequence


class TokenBridge:
    def __init__(self, target_tokenizer, draft_tokenizer) -> None:
        self.target, self.draft = target_tokenizer, draft_tokenizer
        bos = draft_tokenizer.bos_token_id
        self.draft_bos = bos if bos is not None and draft_tokenizer.encode("a")[:1] == [bos] else None

    def to_draft(self, context: Sequence[int]) -> list[int]:
        text = self.target.decode(context, skip_special_tokens=False)
        ids = self.draft.hf.encode(text, add_special_tokens=False)
        return ([self.draft_bos] if self.draft_bos is not None else []) + list(ids)

    def to_target(self, draft_prefix: Sequence[int], draft_new: Sequence[int], k: int) -> list[int]:
        if not draft_new or k < 1:
            return []
        tail = list(draft_prefix[-8:])  # decode in context: sentencepiece drops a leading space alone
        before = self.draft.decode(tail, skip_special_tokens=False)
        text = self.draft.decode(tail + list(draft_new), skip_special_tokens=False)
        new = text[len(before):] if text.startswith(before) else self.draft.decode(draft_new, skip_special_tokens=False)
        new = new.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        if not new:
            return []
        return list(self.target.hf.encode(new, add_special_tokens=False))[:k]
