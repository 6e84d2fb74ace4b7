"""The geometry of one forward pass over a paged KV pool (``leaplm/engine/kv_pool.py``): many sequences' tokens
in one flat pass.

``PagedStep(segments, block_size, window)``: the pass feeds ``N`` tokens, segment by segment (one segment per
request). ``Segment(table, base, positions, parents)``: the request's block table, the logical slot ``base`` of its
first fed token (= its committed length), each fed token's position, and - for a token tree - the tree parents of
its feed indices ``1..`` (``None``: a chain). Feed index ``f`` is written to logical slot ``base + f``.

A query sees (as the engine's cache contract has always said): every committed slot ``< base`` whose position is
within the sliding window (committed slot ``j`` holds position ``j``), then the fed slots of its ancestors and
itself (a chain's ancestors are the tokens fed before it). Each query's visible slots are a *span* of logical slots
plus, for a tree node whose ancestors are not contiguous, the list of its ancestors' slots, exactly what the native
attention op takes (``bind_paged``); it maps them to pool slots through the block tables.

Attention: with the native ops (CPU, float32) every query is attended on its own over exactly its slots
(``leaplm_native::attend``), so a token's result depends on nothing but its own sequence: not on the other
requests in the pass, not on how a prompt was chunked, not on whether a prefix came from the prefix cache.
Otherwise (CUDA, other dtypes) each segment gathers its slots and runs one masked SDPA call: correct, not
batch-invariant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def slot_of(table: Sequence[int], block_size: int, logical: int) -> int:
    """The pool slot of logical slot ``logical`` of a sequence with block table ``table``."""
    return table[logical // block_size] * block_size + logical % block_size


@dataclass
class Segment:
    table: list[int]              # block table of the request
    base: int                     # logical slot of feed index 0 (the request's committed length)
    positions: list[int]          # position of every fed token
    parents: list[int] | None = None   # tree: parents of feed 1.. as ``engine.feed_parents`` gives; None: a chain


class PagedStep:
    """One pass's geometry (see the module docstring). ``positions`` ``[1, N]`` and ``slots`` ``[N]`` (pool slots
    written) are tensors on ``device``; ``bind``/``unbind`` bracket the layers when the native op attends."""

    paged = True

    def __init__(self, segments: Sequence[Segment], block_size: int, window: int | None, device) -> None:
        self.segments = list(segments)
        self.block_size = block_size
        self.window = window
        self.native = False
        pos: list[int] = []
        slots: list[int] = []
        self.starts: list[int] = []   # first query index of each segment
        for seg in self.segments:
            self.starts.append(len(pos))
            pos += seg.positions
            slots += [slot_of(seg.table, block_size, j) for j in range(seg.base, seg.base + len(seg.positions))]
        self.num_tokens = len(pos)
        self.positions = torch.tensor(pos, dtype=torch.long, device=device)[None]
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._spans: dict[bool, tuple[list[int], list[int], list[int]]] = {}
        # KV policies (``cache/policies``): request id -> query rows (lo, hi) whose rotated queries every layer
        # records in ``captured[request id]`` (one [hi - lo, H, D] tensor per layer, in layer order)
        self.capture: dict[int, tuple[int, int]] = {}
        self.captured: dict[int, list[Tensor]] = {}

    # ------------------------------------------------------------------ visible slots
    def visible(self, sliding: bool) -> tuple[list[int], list[int], list[int]]:
        """``(span [2N] lo/hi pairs, anc_off [N + 1], anc [M])``: query n sees logical slots ``lo..hi-1`` of its
        segment, then ``anc[anc_off[n]:anc_off[n + 1]]`` (computed once per kind of layer)."""
        window = self.window if sliding else None
        if window in self._spans:
            return self._spans[window]
        span: list[int] = []
        off = [0]
        anc: list[int] = []
        for seg in self.segments:
            base, positions = seg.base, seg.positions
            if seg.parents is None:
                for f, p in enumerate(positions):
                    span += (max(0, p + 1 - window) if window else 0, base + f + 1)
                    off.append(len(anc))
                continue
            seen_of = tree_seen(seg.parents)
            for f, p in enumerate(positions):
                lo = max(0, p + 1 - window) if window else 0
                seen = [j for j in seen_of[f] if window is None or positions[j] > p - window]
                if seen == list(range(seen[0], f + 1)):   # a contiguous run of fed slots: one span
                    span += (lo if seen[0] == 0 else base + seen[0], base + f + 1)
                else:
                    span += (lo, base)
                    anc += [base + j for j in seen]
                off.append(len(anc))
        self._spans[window] = (span, off, anc)
        return self._spans[window]

    # ------------------------------------------------------------------ native binding
    def bind(self, pool) -> None:
        """Bind the pool and this pass's geometry for ``leaplm_native::attend`` (its keys resolved once)."""
        tables: list[int] = []
        table_off = [0]
        seq: list[int] = []
        for s, seg in enumerate(self.segments):
            tables += seg.table
            table_off.append(len(tables))
            seq += [s] * len(seg.positions)
        full = [torch.tensor(x, dtype=torch.long) for x in self.visible(False)]
        sliding = [torch.tensor(x, dtype=torch.long) for x in self.visible(True)] if self.window else full
        torch.ops.leaplm_native.bind_paged(pool.k, pool.v, self.slots.cpu(), self.block_size,
                                           torch.tensor(tables, dtype=torch.long),
                                           torch.tensor(table_off, dtype=torch.long),
                                           torch.tensor(seq, dtype=torch.long), *full, *sliding)
        self.native = True

    def unbind(self) -> None:
        if self.native:
            torch.ops.leaplm_native.unbind_step()
            self.native = False

    # ------------------------------------------------------------------ attention
    def attend(self, attn, q: Tensor, k: Tensor, v: Tensor, pool) -> Tensor:
        """``q [1, N, H, D]``, ``k, v [1, N, KV, D]`` (rotated) -> ``[1, N, H * D]``; writes ``k, v`` to the pool."""
        for rid, (lo, hi) in self.capture.items():
            self.captured.setdefault(rid, []).append(q[0, lo:hi].clone())
        if self.native:
            return torch.ops.leaplm_native.attend(q, k, v, attn.layer, int(attn.sliding), attn.scale)
        return self._attend_gathered(attn, q, k, v, pool)

    def _attend_gathered(self, attn, q: Tensor, k: Tensor, v: Tensor, pool) -> Tensor:
        """The portable path: per segment, gather its visible slots and run one masked SDPA call."""
        layer = attn.layer
        pool.k[layer][0, :, self.slots] = k[0].transpose(0, 1)
        pool.v[layer][0, :, self.slots] = v[0].transpose(0, 1)
        span, off, anc = self.visible(attn.sliding and self.window is not None)
        out = torch.empty(q.shape[1], attn.num_heads * attn.head_dim, dtype=q.dtype, device=q.device)
        bs = self.block_size
        for seg, start in zip(self.segments, self.starts):
            T = len(seg.positions)
            lo = min(span[2 * n] for n in range(start, start + T))
            hi = seg.base + T
            index = torch.tensor([slot_of(seg.table, bs, j) for j in range(lo, hi)], device=q.device)
            keys, values = pool.k[layer][:, :, index], pool.v[layer][:, :, index]   # [1, KV, L, D]
            mask = torch.zeros(T, hi - lo, dtype=torch.bool)
            for t in range(T):
                n = start + t
                a, b = span[2 * n], span[2 * n + 1]
                if b > a:
                    mask[t, a - lo: b - lo] = True
                for j in anc[off[n]: off[n + 1]]:
                    mask[t, j - lo] = True
            qs = q[:, start: start + T].transpose(1, 2)   # [1, H, T, D]
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask.to(q.device)[None, None],
                                               scale=attn.scale, enable_gqa=attn.num_heads != attn.num_kv_heads)
            out[start: start + T] = o[0].transpose(0, 1).reshape(T, -1)
        return out[None]


def tree_seen(parents: Sequence[int]) -> list[list[int]]:
    """The fed tokens each feed index sees: its ancestors and itself, root (feed 0) first. ``parents`` are the
    tree parents of feed indices ``1..`` in node numbering (``engine.feed_parents``): feed ``f``'s parent is feed
    ``parents[f - 1] + 1`` (``-1``: the root)."""
    seen = [[0]]
    for f, p in enumerate(parents, start=1):
        seen.append(seen[p + 1] + [f])
    return seen
