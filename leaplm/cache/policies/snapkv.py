"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): after the prompt is
prefilled, keep per KV head the prompt tokens its last ``window`` queries (the *observation window*, where the
question usually sits) attend to most, plus the window itself; evict the rest before the first output token.

``snapkv:ratio=0.25`` keeps a quarter of the prompt's tokens (``budget=N``: N tokens; whichever is given);
``window=32`` observation queries, ``kernel=15`` pooling width (scores are average-pooled so that a chosen token
brings its neighbours: the paper's clustering step). The paper's code pools over 5 tokens; leaplm's default is wider
because a fact is several tokens (every digit of a number is one token in Llama/Qwen/SmolLM vocabularies) and the
window's attention points at its start: on SmolLM2 passkey/needle prompts at 1k tokens and a quarter kept, kernel 5
recalled 3 of 6, 9 recalled 4, 15 all 6 (docs/long-context.md). Per layer and KV head: ``softmax(q_w K^T / sqrt(d))`` of the window's
queries over the prompt (causal inside the window), summed over the window, averaged over the query heads of the
group (GQA), pooled, top-``budget - window`` tokens + the window. Each head keeps the same number of tokens (not the
same tokens): the kept keys/values are written, in text order, to freshly allocated blocks and the prompt's blocks
are released, so the request really holds ``budget`` slots from then on (the prompt's blocks stay in the prefix cache
for the next request with that prompt). Tokens keep their text positions.

Memory: the full prompt is held while it is prefilled (the scores need every key), then ``budget`` slots; decode
attention reads ``budget + output`` slots per token instead of ``prompt + output``. Lossy: a fact the window does
not point at is gone. The prompt is never compressed below its window, and a prompt within the budget is kept whole
(exactly the uncompressed output). The compaction is ``prompt_press.py``'s, shared with ``knorm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import InvalidParamsError
from .prompt_press import PromptPress, check_int


class SnapKV(PromptPress):
    name = "snapkv"

    def __init__(self, ratio: float | None = None, budget: int | None = None, window: int = 32,
                 kernel: int = 15) -> None:
        super().__init__(ratio, budget, window)
        check_int(self.name, "kernel", kernel, 1)
        if kernel % 2 == 0:
            raise InvalidParamsError(f"snapkv: kernel must be odd (a centred pooling window), got {kernel}")
        self.kernel = kernel

    def knobs(self) -> dict:
        return {**super().knobs(), "kernel": self.kernel}

    def select(self, queries: torch.Tensor, keys: torch.Tensor, keep: int, scale: float) -> torch.Tensor:
        """``queries [w, H, D]`` (the prompt's last ``w`` tokens), ``keys [KV, P, D]`` -> the ``keep`` token
        indices each KV head keeps ``[KV, keep]``, ascending: the window plus the best-scored earlier tokens."""
        w, H, D = queries.shape
        KV, P, _ = keys.shape
        q = queries.float().reshape(w, KV, H // KV, D).permute(1, 2, 0, 3)   # [KV, G, w, D]
        logits = torch.matmul(q, keys.float().transpose(-1, -2)[:, None]) * scale   # [KV, G, w, P]
        pos = torch.arange(P, device=keys.device)
        qpos = torch.arange(P - w, P, device=keys.device)
        logits = logits.masked_fill(pos[None, :] > qpos[:, None], float("-inf"))
        weights = logits.softmax(dim=-1)[..., : P - w]            # [KV, G, w, P - w]
        scores = weights.sum(dim=2).mean(dim=1)                   # [KV, P - w]
        if self.kernel > 1:
            scores = F.avg_pool1d(scores[:, None], self.kernel, stride=1, padding=self.kernel // 2,
                                  count_include_pad=False)[:, 0]
        top = scores.topk(keep - w, dim=-1).indices               # [KV, keep - w]
        return self.with_window(top, P)
