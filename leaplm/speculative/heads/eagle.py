"""The EAGLE draft head: one decoder layer over the target's own features (Li et al. 2024, EAGLE-1/2/3).

At index ``j`` of a sequence the head reads ``f_j``, the target's final hidden state of token ``j`` (after its last
norm: what its LM head reads), and the embedding of the next token ``x_{j+1}``:

    u_j = fc([norm_f(f_j) ; norm_e(embed(x_{j+1}))])  [.., 2H] -> [.., H]   (EAGLE-3: both parts RMS-normed, since
                                                      the target's features are ~1000x larger than its embeddings)
    h_j = decoder_layer(u_j)                          the target's layer type: RMSNorm, rotary GQA attention over
                                                      the head's own keys/values of indices <= j, gated MLP
    g_j = out_norm(h_j)                               the predicted feature f_{j+1}
    logits_j = g_j @ W[draft_vocab].T                 the target's LM head rows of the draft vocabulary (frozen)

``g_j`` predicts ``f_{j+1}``, so ``logits_j`` predicts token ``x_{j+2}``; fed back as ``[g_j ; embed(token)]`` it
drafts the next token again (a chain, or a tree grown EAGLE-2 style by ``drafters/eagle.py``). The rotary position
of index ``j`` is ``j + 1``. The draft vocabulary (EAGLE-3's reduced vocabulary) holds the ``draft_vocab_size`` most
frequent next tokens of the training data: its LM head costs ``draft_vocab_size / vocab`` of the full one.

Saved as a folder: ``eagle.safetensors`` (the head's own weights and ``draft_vocab`` ``[Vd]`` int64) and
``config.json`` (``EagleConfig`` plus training metadata). The embedding and LM head rows are the target's, taken at
``bind`` (never saved): a head only works with the target it was trained on (``target`` in the config: vocab and
hidden sizes, and a fingerprint of the embedding, are checked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import (CONFIG_FILE, AttentionHead, check_target, embed_fingerprint, lm_weight, load_head, rms, save_head,
                     weights_file)

WEIGHTS_FILE = weights_file("eagle")
__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "EagleConfig", "EagleHead", "embed_fingerprint", "lm_weight"]


@dataclass
class EagleConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool = False
    qk_norm: bool = False
    vocab_size: int = 0                 # the target's
    draft_vocab_size: int = 0
    target: dict = field(default_factory=dict)      # what the head was trained on (checked at bind)
    training: dict = field(default_factory=dict)    # how (steps, loss, accuracy, data, time)

    @classmethod
    def for_target(cls, cfg, draft_vocab_size: int, intermediate_size: int | None = None) -> "EagleConfig":
        """The target's layer geometry (``ModelConfig``), with an optional smaller MLP (a CPU budget)."""
        return cls(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, intermediate_size=intermediate_size or cfg.intermediate_size,
                   rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias, qk_norm=cfg.qk_norm,
                   vocab_size=cfg.vocab_size, draft_vocab_size=min(draft_vocab_size, cfg.vocab_size))


class EagleHead(AttentionHead):
    """The head's trainable weights and its forward pieces. Shapes: ``H`` hidden, ``nh``/``kv`` query/key heads,
    ``D`` head dim, ``Vd`` draft vocabulary; token-major tensors ``[N, ...]`` (training adds a batch dim in front).
    ``embed [V, H]`` and ``lm [Vd, H]`` are the target's (buffers, frozen, not saved)."""

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        c = self.config = config
        H, I = c.hidden_size, c.intermediate_size
        self.feature_norm = nn.Parameter(torch.ones(H))
        self.embed_norm = nn.Parameter(torch.ones(H))
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.init_attention()   # attn_norm, qkv, o (, q_norm, k_norm)
        self.mlp_norm = nn.Parameter(torch.ones(H))
        self.gate_up = nn.Linear(H, 2 * I, bias=False)
        self.down = nn.Linear(I, H, bias=False)
        self.out_norm = nn.Parameter(torch.ones(H))
        self.register_buffer("draft_vocab", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.embed: Tensor | None = None
        self.lm: Tensor | None = None

    # ------------------------------------------------------------------ the target's parts
    def attach(self, target) -> None:
        """Take the target's embedding, LM head rows of the draft vocabulary and rotary tables (a
        ``leaplm.models.transformer.Transformer``); checks that the head was trained for it."""
        check_target("EAGLE", self.config, target)
        self.embed = target.embed.detach().float()
        self.lm = lm_weight(target)[self.draft_vocab].float().contiguous()
        self.rotary = target.rotary["full"]

    # ------------------------------------------------------------------ forward pieces
    def inputs(self, features: Tensor, next_tokens: Tensor) -> Tensor:
        """``[.., H]`` features and ``[..]`` next-token ids -> the layer's input ``[.., H]``."""
        eps = self.config.rms_norm_eps
        return self.fc(torch.cat((rms(features, self.feature_norm, eps),
                                  rms(F.embedding(next_tokens, self.embed), self.embed_norm, eps)), dim=-1))

    def finish(self, u: Tensor, attn: Tensor) -> Tensor:
        """The layer's residual stream after attention ``attn [.., nh*D]`` -> predicted feature ``g [.., H]``."""
        c = self.config
        h = u + self.o(attn)
        gate, up = self.gate_up(rms(h, self.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        h = h + self.down(F.silu(gate) * up)
        return rms(h, self.out_norm, c.rms_norm_eps)

    def logits(self, g: Tensor) -> Tensor:
        """``g [.., H]`` -> draft-vocabulary logits ``[.., Vd]``."""
        return g @ self.lm.T

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> None:
        save_head(self, self.config, "eagle", folder)

    @classmethod
    def load(cls, folder: str | Path) -> "EagleHead":
        """A head saved by ``save``; ``InvalidParamsError`` naming what is missing or wrong."""
        return load_head(cls, EagleConfig, "eagle", folder)
