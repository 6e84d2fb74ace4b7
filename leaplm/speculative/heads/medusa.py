"""Medusa heads: ``K`` residual heads read the target's last hidden state and guess the tokens after the next one
(Cai et al. 2024, Medusa-1).

At index ``j`` the target's final hidden state ``f_j`` (after its last norm: what its LM head reads) gives the next
token ``x_{j+1}`` through the target's own LM head. Head ``k`` (``k = 1..K``) guesses ``x_{j+1+k}`` from the same
``f_j``, with no view of the tokens in between:

    h = f_j;  for each of the head's ``layers`` residual blocks:  h = h + SiLU(W h + b)     W ``[H, H]``
    logits_k = exp(t_k) * (h @ W_lm[draft_vocab].T)                                       ``[Vd]``

Medusa-1 gives each head its own LM head initialised from the target's; on a CPU with a 150k vocabulary that is
K x 230M weights, so the heads here share the target's **frozen** LM head restricted to a draft vocabulary (the
``draft_vocab_size`` most frequent answer tokens, as for EAGLE-3), and only the residual blocks train. ``W`` starts
at zero (Medusa's initialisation), so an untrained head guesses the next token itself. ``t_k`` (a learnt log
temperature per head, starting at 0) lets a head be less sure than the target's LM head is of the next token: the
trees are grown by the heads' probabilities.

Saved as a folder: ``medusa.safetensors`` (the blocks and ``draft_vocab`` ``[Vd]`` int64) and ``config.json``
(``MedusaConfig`` with training metadata); the LM head rows and the embedding fingerprint check come from the target
at ``bind`` (``heads/common.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import check_target, embed_fingerprint, lm_weight, load_head, save_head

__all__ = ["MedusaConfig", "MedusaHeads", "embed_fingerprint"]


@dataclass
class MedusaConfig:
    hidden_size: int
    num_heads: int                      # K: head k guesses the token k + 1 places ahead of the feature's token
    num_layers: int = 1                 # residual blocks per head
    vocab_size: int = 0                 # the target's
    draft_vocab_size: int = 0
    target: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


class MedusaHeads(nn.Module):
    """``K`` heads; ``blocks[k][l]`` the ``l``-th residual block of head ``k`` (``nn.Linear(H, H)``). ``lm [Vd, H]``
    is the target's (a buffer taken at ``attach``, frozen, not saved)."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = c = config
        self.blocks = nn.ModuleList(nn.ModuleList(nn.Linear(c.hidden_size, c.hidden_size) for _ in range(c.num_layers))
                                    for _ in range(c.num_heads))
        for head in self.blocks:
            for layer in head:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_scale = nn.Parameter(torch.zeros(c.num_heads))
        self.register_buffer("draft_vocab", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.lm: Tensor | None = None
        self.lm_matmul = None   # h [.., H] -> h @ lm.T (an int8 kernel after bind on CPU; None: float32)

    def attach(self, target) -> None:
        """Take the target's LM head rows of the draft vocabulary; checks that the heads were trained for it."""
        check_target("Medusa", self.config, target)
        self.lm = lm_weight(target)[self.draft_vocab].float().contiguous()

    def features(self, f: Tensor) -> Tensor:
        """``f [.., H]`` -> every head's transformed feature ``[K, .., H]``."""
        out = []
        for head in self.blocks:
            h = f
            for layer in head:
                h = h + F.silu(layer(h))
            out.append(h)
        return torch.stack(out)

    def logits(self, h: Tensor, head: int | None = None) -> Tensor:
        """Head ``head``'s ``h [.., H]`` (or every head's, ``[K, .., H]``, when None) -> logits ``[.., Vd]``."""
        raw = self.lm_matmul(h) if self.lm_matmul is not None else h @ self.lm.T
        scale = self.log_scale.exp()
        if head is not None:
            return raw * scale[head]
        return raw * scale.reshape(-1, *[1] * (raw.dim() - 1))

    def forward(self, f: Tensor) -> Tensor:
        """``f [.., H]`` -> ``[K, .., Vd]`` logits of each head."""
        return self.logits(self.features(f))

    def save(self, folder: str | Path) -> None:
        save_head(self, self.config, "medusa", folder)

    @classmethod
    def load(cls, folder: str | Path) -> "MedusaHeads":
        """Heads saved by ``save``; ``InvalidParamsError`` naming what is missing or wrong."""
        return load_head(cls, MedusaConfig, "medusa", folder)
