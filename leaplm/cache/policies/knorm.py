"""Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"): keep the
prompt tokens whose keys have the *smallest* L2 norm (they draw the most attention), per layer and KV head, plus the
prompt's last ``window`` tokens; no queries needed (query-agnostic: the same choice whatever is asked). kvpress's
``KnormPress`` baseline.

``knorm:ratio=0.25`` (or ``budget=N``), ``window=32`` (``0``: the norm alone decides, as kvpress). Compressed once the
prompt is prefilled, like ``snapkv`` (``prompt_press.py``). Lossy.
"""
from __future__ import annotations

import torch

from .prompt_press import PromptPress


class Knorm(PromptPress):
    name = "knorm"
    needs_queries = False

    def __init__(self, ratio: float | None = None, budget: int | None = None, window: int = 32) -> None:
        super().__init__(ratio, budget, window)

    def select(self, queries, keys: torch.Tensor, keep: int, scale: float) -> torch.Tensor:
        """``keys [KV, P, D]`` -> ``[KV, keep]``: the window + the smallest-norm keys before it."""
        P = keys.shape[1]
        w = min(self.window, P)
        norms = keys[:, : P - w].float().norm(dim=-1)             # [KV, P - w]
        top = (-norms).topk(keep - w, dim=-1).indices
        return self.with_window(top, P)
