"""Training a Kangaroo adapter on self-distilled data (``distill.py``), on the CPU (the target stays frozen).

The shallow states ``s_j`` (the target's first ``exit_layer`` layers) of every data token are computed once, by
whole sequences (``shallow_states``). Windows of ``seq_len`` indices are then cut from them: the adapter attends
causally within the window and is trained with cross-entropy over the draft vocabulary to predict ``x_{j+1}``, the
target's own next token (its greedy answer: hard distillation of the full stack). Only answer tokens are labels.

Because the self-draft reads real tokens, a drafted chain conditions on exactly what teacher forcing shows it as
long as its earlier guesses were accepted: the held-out top-1 accuracy ``acc[0]`` is the acceptance rate at every
depth.

``train_kangaroo(...)`` trains with ``loop.fit`` and saves the adapter (``KangarooAdapter.save``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..speculative.heads.kangaroo import KangarooAdapter, KangarooConfig
from .distill import Dataset
from .loop import TrainConfig, prepare, split, train_head, vocab_index


@torch.inference_mode()
def shallow_states(adapter: KangarooAdapter, data: Dataset, batch: int = 8) -> np.ndarray:
    """``[N, H]`` float16: every data token's state after the target's first ``exit_layer`` layers."""
    from ..cache.kv import KVCache
    from ..models.transformer import _Step

    t = adapter._target
    cfg = replace(t.config, num_layers=adapter.config.exit_layer,
                  layer_types=t.config.layer_types[: adapter.config.exit_layer])
    out = np.zeros((data.num_tokens, t.config.hidden_size), dtype=np.float16)
    order = sorted(range(len(data.sequences)), key=lambda i: data.sequences[i][2])
    for lo in range(0, len(order), batch):
        group = [data.sequences[i] for i in order[lo: lo + batch]]
        T = max(length for _, _, length in group)
        tokens = torch.zeros(len(group), T, dtype=torch.long)
        for b, (start, _, length) in enumerate(group):
            tokens[b, :length] = torch.from_numpy(np.asarray(data.tokens[start: start + length], dtype=np.int64))
        positions = torch.arange(T)[None].expand(len(group), -1)
        cache = KVCache.for_model(cfg, len(group), T, t.dtype, t.device)
        s = adapter.shallow(tokens, positions, cache, _Step(positions, cfg, T, 0))
        for b, (start, _, length) in enumerate(group):
            out[start: start + length] = s[b, :length].numpy().astype(np.float16)
    return out


def losses(adapter: KangarooAdapter, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The training loss of a batch and [(correct top-1 predictions, predictions)]."""
    T = cfg.seq_len
    s, known = batch["feats"][:, :T], batch["known"][:, :T]
    q, k, v = adapter.project(s, adapter.rope(torch.arange(T)[None].expand(s.shape[0], -1)))
    out = adapter.finish(s, adapter.attend_causal(q, k, v, known))
    ok = known & batch["label_ok"][:, 1: T + 1]
    if not ok.any():
        return out.sum() * 0.0, [(0, 0)]
    logits = adapter.logits(out[ok])
    target = batch["labels"][:, 1: T + 1][ok]
    return F.cross_entropy(logits.float(), target), [(int((logits.argmax(-1) == target).sum()), int(ok.sum()))]


def train_kangaroo(target, data: Dataset, out: str | Path, cfg: TrainConfig, exit_layer: int = 2, resume: bool = True,
                   progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) a Kangaroo adapter exiting after ``exit_layer`` layers of ``target`` (a leaplm
    ``Transformer``) on ``data`` (its tokens; the recorded features are not used); returns a summary."""
    out, vocab, record = prepare(target, data, cfg, out, features=False)   # the data's features are not read
    head_cfg = KangarooConfig.for_target(target.config, exit_layer, len(vocab))
    head_cfg.target = record
    adapter = KangarooAdapter(head_cfg)
    adapter.draft_vocab.copy_(vocab)
    adapter.attach(target)
    states = SimpleNamespace(tokens=data.tokens, features=shallow_states(adapter, data),
                             hidden_size=target.config.hidden_size)
    return train_head(adapter, data, states, split(data, cfg), vocab_index(vocab, target.config.vocab_size), 1,
                      lambda batch: losses(adapter, batch, cfg), 1, cfg, out, resume, progress, exit_layer=exit_layer)
