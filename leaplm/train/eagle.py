"""Training an EAGLE head on self-distilled data (``distill.py``), on the CPU, with training-time test.

Windows of ``seq_len`` indices are cut from the data's sequences. **Step 0** is EAGLE-1's teacher-forced pass:
index ``j`` reads the target's feature ``f_j`` and token ``x_{j+1}`` and predicts ``f_{j+1}`` (SmoothL1, weight
``feature_weight``) and token ``x_{j+2}`` (cross-entropy over the draft vocabulary). **Steps 1..unroll-1**
(EAGLE-3's training-time test) feed the head its own prediction instead of the target's feature, as drafting
does: at step ``s`` anchor ``j`` reads ``[g^{s-1}_j ; embed(x_{j+1+s})]`` at position ``j + 1 + s`` and attends to
the real keys of indices ``<= j`` plus its own chain's keys of steps ``1..s`` (the diagonal), exactly the view a
depth-``s`` draft node has of the head's cache. Step ``s``'s losses are weighted ``0.8 ** s``. Only tokens of the
target's answers are predicted (the prompt's tokens are the user's, not the target's).

``train_eagle(...)`` trains with ``loop.fit`` (AdamW, time budget, held-out accuracy by depth, resumable state,
``training.png``) and saves the head (``EagleHead.save``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..speculative.heads.eagle import EagleConfig, EagleHead
from .distill import Dataset
from .loop import TrainConfig, expected_accepted, prepare, split, train_head, vocab_index

__all__ = ["TrainConfig", "expected_accepted", "losses", "train_eagle"]


def _ttt_attention(head: EagleHead, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                   key_ok: torch.Tensor) -> torch.Tensor:
    """q ``[B, T, nh, D]``; ``keys[0]``/``values[0]`` ``[B, T, kv, D]`` the real (step-0) ones, seen causally where
    ``key_ok [B, T]``; ``keys[t]`` (t >= 1) the same anchor's step-t keys, seen on the diagonal -> ``[B, T, nh*D]``."""
    c = head.config
    group = c.num_heads // c.num_kv_heads
    B, T = q.shape[:2]
    scale = c.head_dim ** -0.5
    expand = [k.repeat_interleave(group, 2) for k in keys]
    vexp = [v.repeat_interleave(group, 2) for v in values]
    real = torch.einsum("bqhd,bkhd->bhqk", q, expand[0]) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = real.masked_fill(~(causal[None, None] & key_ok[:, None, None, :]), float("-inf"))
    diag = [torch.einsum("bqhd,bqhd->bhq", q, k)[..., None] * scale for k in expand[1:]]
    probs = torch.softmax(torch.cat([real, *diag], dim=-1), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs[..., :T], vexp[0])
    for t, v in enumerate(vexp[1:]):
        out = out + probs[..., T + t].permute(0, 2, 1)[..., None] * v
    return out.reshape(B, T, head.q_size)


def losses(head: EagleHead, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The training loss of a batch and, per unroll step, (correct top-1 predictions, predictions)."""
    T = cfg.seq_len
    feats, tokens, known = batch["feats"], batch["tokens"], batch["known"]
    positions = torch.arange(T)[None].expand(feats.shape[0], -1)
    keys, values = [], []
    g = feats[:, :T]
    total = feats.new_zeros(())
    counts = []
    for s in range(cfg.unroll):
        u = head.inputs(g, tokens[:, 1 + s: T + 1 + s])
        cos, sin = head.rope(positions + 1 + s)
        q, k, v = head.project(u, (cos, sin))
        keys.append(k)
        values.append(v)
        g = head.finish(u, _ttt_attention(head, q, keys, values, known[:, :T]))
        logits = head.logits(g)                                            # [B, T, Vd]
        ok = known[:, :T] & batch["label_ok"][:, 2 + s: T + 2 + s]
        target = batch["labels"][:, 2 + s: T + 2 + s]
        weight = 0.8 ** s
        if ok.any():
            ce = F.cross_entropy(logits[ok], target[ok])
            feat_ok = ok & known[:, 1 + s: T + 1 + s]
            reg = F.smooth_l1_loss(g[feat_ok], feats[:, 1 + s: T + 1 + s][feat_ok]) if feat_ok.any() else 0.0
            total = total + weight * (ce + cfg.feature_weight * reg)
            counts.append((int((logits[ok].argmax(-1) == target[ok]).sum()), int(ok.sum())))
        else:
            counts.append((0, 0))
    return total, counts


def train_eagle(target, data: Dataset, out: str | Path, cfg: TrainConfig, resume: bool = True,
                progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) an EAGLE head for ``target`` (a leaplm ``Transformer``) on ``data``; returns a summary."""
    out, vocab, record = prepare(target, data, cfg, out)
    head_cfg = EagleConfig.for_target(target.config, len(vocab), cfg.intermediate_size)
    head_cfg.target = record
    head = EagleHead(head_cfg)
    head.draft_vocab.copy_(vocab)
    head.attach(target)
    index = vocab_index(vocab, target.config.vocab_size)
    return train_head(head, data, data, split(data, cfg), index, cfg.unroll, lambda batch: losses(head, batch, cfg),
                      cfg.unroll, cfg, out, resume, progress)

