"""Kangaroo: the target's own first layers plus a trained adapter draft a chain, stopping when unsure.

``Kangaroo(path=DIR)`` loads an adapter made by ``leaplm train-drafter --method kangaroo``
(``speculative/heads/kangaroo.py`` has its equations). The draft model is the target exited after layer ``L``
(its weights are the target's: nothing is copied). Per request the drafter keeps the keys/values of those ``L``
layers and of the adapter, by position.

``propose(row, context, k)``:

1. the tokens whose states are missing (those committed since the last call and the pending token, found by
   comparing the context with the tokens already run) go through the ``L`` layers and the adapter in one pass; the
   pending token's output is the first guess;
2. each guess is drafted while its probability (the adapter's top-1 confidence) is at least ``confidence``
   (Kangaroo's early stop, the second "exit"), up to ``min(k, num_draft)`` tokens; each drafted token is run
   through the ``L`` layers and the adapter to give the next guess. Their states sit past the committed ones and are
   overwritten by the next call.

A chain of deterministic drafts: verification is lossless for greedy and sampled requests alike.

Unlike the paper, the drafter's ``L`` layers keep their own keys/values instead of sharing the target's cache, and
the verification pass recomputes those layers for the drafted tokens: each committed token costs ``L / N`` of a
target step once more (docs/trained-drafters.md).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from ...errors import InvalidParamsError
from .base import Draft
from .trained import TrainedDrafter, int8_linears


@dataclass
class _Row:
    cache: object                  # KVCache of the L shallow layers, one row
    k: Tensor                      # [cap, kv, D] the adapter's keys by position
    v: Tensor
    ids: list[int]                 # tokens whose states are computed, by position


class Kangaroo(TrainedDrafter):
    name = "kangaroo"
    needs_hidden = False

    def __init__(self, path: str, num_draft: int = 6, confidence: float = 0.6, quantization: str | None = "int8",
                 lookup: bool = False) -> None:
        super().__init__("kangaroo", num_draft, quantization, 0.0, lookup)
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence < 1:
            raise InvalidParamsError(f"kangaroo confidence must be a number in [0, 1), got {confidence!r}")
        self.path, self.confidence = str(path), float(confidence)
        from ..heads.kangaroo import KangarooAdapter

        self.adapter = KangarooAdapter.load(self.path)
        self.rows: dict[int, _Row] = {}

    def bind(self, target_model, target_tokenizer=None) -> None:
        a = self.adapter
        a.attach(target_model)
        a.eval().requires_grad_(False)
        if self.quantization == "int8" and target_model.device.type == "cpu":
            lm = int8_linears(a, ("qkv", "o"), a.lm)
            a.logits = lambda h: lm(h)
        self._shallow_config = replace(target_model.config, num_layers=a.config.exit_layer,
                                       layer_types=target_model.config.layer_types[: a.config.exit_layer])
        self._dtype, self._device = target_model.dtype, target_model.device

    def reset(self, row: int) -> None:
        super().reset(row)
        self.rows.pop(row, None)

    def committed(self, row: int, tokens: Sequence[int], hidden: Tensor | None = None, start: int | None = None) -> None:
        self.count_verdict(row, tokens)

    def _row(self, row: int, need: int) -> _Row:
        from ...cache.kv import KVCache

        r = self.rows.get(row)
        if r is not None and r.k.shape[0] >= need:
            return r
        c = self.adapter.config
        cap = max(need, 256, 2 * (r.k.shape[0] if r is not None else 0))
        grown = _Row(KVCache.for_model(self._shallow_config, 1, cap, self._dtype, self._device),
                     torch.zeros(cap, c.num_kv_heads, c.head_dim), torch.zeros(cap, c.num_kv_heads, c.head_dim),
                     list(r.ids) if r is not None else [])
        if r is not None:
            n = r.k.shape[0]
            grown.k[:n], grown.v[:n] = r.k, r.v
            for new, old in zip((*grown.cache.k, *grown.cache.v), (*r.cache.k, *r.cache.v)):
                new[:, :, :n] = old
        self.rows[row] = grown
        return grown

    def _run(self, r: _Row, tokens: list[int], start: int) -> Tensor:
        """States of ``tokens`` at positions ``start..``: shallow layers + adapter -> draft log-probs of the last."""
        from ...models.transformer import _Step

        a = self.adapter
        n = len(tokens)
        positions = torch.arange(start, start + n)
        step = _Step(positions[None], self._shallow_config, start + n, start)
        s = a.shallow(torch.tensor([tokens]), positions[None], r.cache, step)[0]         # [n, H]
        q, k, v = a.project(s, a.rope(positions))
        r.k[start: start + n], r.v[start: start + n] = k, v
        mask = torch.arange(start + n)[None] <= positions[:, None]
        out = a.finish(s[-1:], a.attend(q[-1:], r.k[: start + n], r.v[: start + n], mask[-1:]))
        del r.ids[start:]
        r.ids += tokens
        return torch.log_softmax(a.logits(out)[0].float(), dim=-1)

    @torch.inference_mode()
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        budget = min(k, self.num_draft)
        if budget < 1 or not context:
            return Draft([])
        copy = self.copy_draft(row, context, budget)
        if copy is not None:
            return copy
        r = self._row(row, len(context) + budget + 1)
        same = 0                       # positions whose states hold exactly these tokens
        limit = min(len(r.ids), len(context) - 1)
        while same < limit and r.ids[same] == context[same]:
            same += 1
        logp = self._run(r, list(context[same:]), same)
        vocab = self.adapter.draft_vocab
        tokens: list[int] = []
        expected, p_path = 0.0, 1.0
        while True:
            lp, ix = logp.max(-1)
            p = float(lp.exp())
            if p < self.confidence:
                break
            tokens.append(int(vocab[ix]))
            p_path *= p
            expected += p_path
            if len(tokens) == budget:
                break
            logp = self._run(r, tokens[-1:], len(context) + len(tokens) - 1)
        if tokens:
            self._drafted[row] = expected
        return Draft(tokens)
