"""Training Medusa heads on self-distilled data (``distill.py``), on the CPU (Medusa-1: the target stays frozen).

Windows of ``seq_len`` indices are cut from the data's sequences. Head ``k`` (``k = 1..K``) reads the target's
feature ``f_j`` and is trained with cross-entropy over the draft vocabulary to predict ``x_{j+1+k}``, the token
``k`` places after the one the target's own LM head gives; head ``k``'s loss is weighted ``0.8 ** (k - 1)`` (Medusa's
decaying weights). Only the target's answer tokens are labels. Held-out accuracy ``acc[k-1]`` is head ``k``'s top-1
accuracy on its own (the heads do not see each other's guesses).

``train_medusa(...)`` trains with ``loop.fit`` (AdamW, time budget, resumable state, ``training.png``) and saves the
heads (``MedusaHeads.save``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..speculative.heads.medusa import MedusaConfig, MedusaHeads
from .distill import Dataset
from .loop import TrainConfig, prepare, split, train_head, vocab_index


def losses(heads: MedusaHeads, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The training loss of a batch and, per head, (correct top-1 predictions, predictions)."""
    T = cfg.seq_len
    known = batch["known"][:, :T]
    hs = heads.features(batch["feats"][:, :T])                 # [K, B, T, H]
    total = hs.new_zeros(())
    counts = []
    for k in range(heads.config.num_heads):
        ok = known & batch["label_ok"][:, 2 + k: T + 2 + k]
        if not ok.any():
            counts.append((0, 0))
            continue
        logits = heads.logits(hs[k][ok], k)                     # [N, Vd]
        target = batch["labels"][:, 2 + k: T + 2 + k][ok]
        total = total + 0.8 ** k * F.cross_entropy(logits.float(), target)
        counts.append((int((logits.argmax(-1) == target).sum()), int(ok.sum())))
    return total, counts


def train_medusa(target, data: Dataset, out: str | Path, cfg: TrainConfig, resume: bool = True,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) ``cfg.heads`` Medusa heads for ``target`` (a leaplm ``Transformer``) on ``data``; returns
    a summary."""
    out, vocab, record = prepare(target, data, cfg, out)
    c = target.config
    heads = MedusaHeads(MedusaConfig(hidden_size=c.hidden_size, num_heads=cfg.heads, num_layers=cfg.layers,
                                     vocab_size=c.vocab_size, draft_vocab_size=len(vocab), target=record))
    heads.draft_vocab.copy_(vocab)
    heads.attach(target)
    return train_head(heads, data, data, split(data, cfg), vocab_index(vocab, c.vocab_size), cfg.heads,
                      lambda batch: losses(heads, batch, cfg), cfg.heads, cfg, out, resume, progress)
