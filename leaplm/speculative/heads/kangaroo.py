"""The Kangaroo adapter: the target's first ``L`` layers plus one small trained layer make a self-draft model
(Liu et al. 2024, Kangaroo: lossless self-speculative decoding via double early exiting).

The draft model is the target itself, exited early: token ``x_j`` goes through the target's embedding and its first
``exit_layer`` decoder layers (their weights are the target's, shared, not copied) to the shallow state ``s_j``;
the adapter turns it into a next-token guess:

    a_j = s_j + o(attention(norm_a(s_j)))      rotary GQA attention of the target's geometry over the adapter's own
                                               keys/values of indices <= j (Kangaroo's adapter: one attention layer
                                               and two norms, no MLP)
    logits_j = norm_out(a_j) @ W_lm[draft_vocab].T     the target's LM head rows of a draft vocabulary (frozen)

``logits_j`` predicts ``x_{j+1}``, the token the target's full stack would give. Only the adapter trains (its
attention and two norms); ``attach(target)`` takes the target's blocks, embedding, rotary tables and LM head rows.

Saved as a folder: ``kangaroo.safetensors`` (the adapter and ``draft_vocab`` ``[Vd]`` int64) and ``config.json``
(``KangarooConfig`` with training metadata; ``heads/common.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InvalidParamsError
from .common import AttentionHead, check_target, embed_fingerprint, lm_weight, load_head, rms, save_head

__all__ = ["KangarooConfig", "KangarooAdapter", "embed_fingerprint"]


@dataclass
class KangarooConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    exit_layer: int                     # L: the shallow sub-network is the target's layers 0 .. L-1
    attention_bias: bool = False
    qk_norm: bool = False
    vocab_size: int = 0
    draft_vocab_size: int = 0
    target: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    @classmethod
    def for_target(cls, cfg, exit_layer: int, draft_vocab_size: int) -> "KangarooConfig":
        if not 1 <= exit_layer < cfg.num_layers:
            raise InvalidParamsError(f"kangaroo exit layer must be in [1, {cfg.num_layers - 1}] for a model with "
                                     f"{cfg.num_layers} layers, got {exit_layer}")
        return cls(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, exit_layer=exit_layer,
                   attention_bias=cfg.attention_bias, qk_norm=cfg.qk_norm, vocab_size=cfg.vocab_size,
                   draft_vocab_size=min(draft_vocab_size, cfg.vocab_size))


class KangarooAdapter(AttentionHead):
    """The adapter's weights (``attn_norm``, ``qkv``, ``o``, ``out_norm``) and the shallow pass through the
    target's first layers (``shallow``)."""

    def __init__(self, config: KangarooConfig) -> None:
        super().__init__()
        self.config = config
        self.init_attention()
        self.out_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.register_buffer("draft_vocab", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.lm: Tensor | None = None
        self._target = None   # not a submodule: its weights are the target's

    def attach(self, target) -> None:
        """Take the target's first layers, embedding, rotary tables and LM head rows; checks the target."""
        check_target("Kangaroo", self.config, target)
        if self.config.exit_layer >= target.config.num_layers:
            raise InvalidParamsError(f"this Kangaroo adapter exits after layer {self.config.exit_layer}, but the "
                                     f"model has {target.config.num_layers} layers")
        object.__setattr__(self, "_target", target)   # a plain reference: the target's weights are not ours
        self.lm = lm_weight(target)[self.draft_vocab].float().contiguous()
        self.rotary = target.rotary["full"]

    @property
    def target_config(self):
        return self._target.config

    @torch.no_grad()
    def shallow(self, tokens: Tensor, positions: Tensor, cache, step) -> Tensor:
        """The target's first ``exit_layer`` layers: tokens, positions ``[B, T]`` -> ``s [B, T, H]`` (float32),
        writing those layers' keys/values into ``cache`` (a ``KVCache`` of ``exit_layer`` layers) by ``step``."""
        t = self._target
        x = F.embedding(tokens, t.embed)
        if t.config.embed_scale is not None:
            x = x * torch.tensor(t.config.embed_scale, dtype=x.dtype)
        ropes = {name: rot(positions, x.dtype) for name, rot in t.rotary.items()}
        ropes.setdefault("sliding", ropes["full"])
        for block in t.blocks[: self.config.exit_layer]:
            x = block(x, ropes, cache, step)
        return x.float()

    def finish(self, s: Tensor, attn: Tensor) -> Tensor:
        """The adapter's output ``[.., H]`` from the shallow state and its attention ``[.., nh*D]``."""
        return rms(s + self.o(attn), self.out_norm, self.config.rms_norm_eps)

    def logits(self, a: Tensor) -> Tensor:
        return a @ self.lm.T

    def save(self, folder: str | Path) -> None:
        save_head(self, self.config, "kangaroo", folder)

    @classmethod
    def load(cls, folder: str | Path) -> "KangarooAdapter":
        return load_head(cls, KangarooConfig, "kangaroo", folder)
