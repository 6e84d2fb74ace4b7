"""``PromptPress``: the shared machinery of policies that compress the prompt once it is prefilled (SnapKV, Knorm):
how many tokens stay, the feed cap at the prompt's end, the prompt queries of an observation window, and the
compaction itself. A subclass only scores: ``select(queries, keys, keep, scale) -> [KV, keep]`` token indices.

Compaction: per layer and KV head, the kept keys/values (each head its own tokens, the same number per head, in
text order) are written to freshly allocated blocks and the prompt's blocks are released, so the request really holds
``keep`` slots from then on (the prompt's blocks stay in the prefix cache for the next request with that prompt);
``kv_shift = prompt - keep``. Tokens keep their text positions. A prompt within the budget is kept whole (exactly the
uncompressed output). When the pool has no room for the copy, the kept keys/values are written in place into the
request's own first blocks (dropped from the prefix cache first); only when those are shared with another running
request does it stay uncompressed, and says so (``kv_state["skipped"]``, ``metrics["kv_policy_skipped"]``).
"""
from __future__ import annotations

import math

import torch

from ...errors import InvalidParamsError
from ...models.paged import slot_of
from .base import KVAccess, KVPolicy, replace_blocks


def check_int(policy: str, knob: str, value, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise InvalidParamsError(f"{policy}: {knob} must be an integer >= {low}, got {value!r}")


class PromptPress(KVPolicy):
    """Base of prompt-compressing policies. ``window``: the prompt's last tokens, always kept; their queries are
    captured when ``needs_queries``."""

    needs_queries = True

    def __init__(self, ratio: float | None, budget: int | None, window: int) -> None:
        if ratio is None and budget is None:
            ratio = 0.25
        if ratio is not None and budget is not None:
            raise InvalidParamsError(f"{self.name}: give ratio (fraction of the prompt kept) or budget (tokens "
                                     "kept), not both")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio <= 1):
            raise InvalidParamsError(f"{self.name}: ratio is the fraction of the prompt's tokens kept, in (0, 1]; "
                                     f"got {ratio!r}")
        check_int(self.name, "budget", budget, 1)
        check_int(self.name, "window", window, 0 if not self.needs_queries else 1)
        self.ratio, self.budget, self.window = ratio, budget, window
        self.capture = window if self.needs_queries else 0

    def knobs(self) -> dict:
        out = {"ratio": self.ratio} if self.ratio is not None else {"budget": self.budget}
        return {**out, "window": self.window}

    def kept(self, prompt_len: int) -> int:
        """Tokens of a ``prompt_len``-token prompt that stay (at least the window, at most all of them)."""
        want = self.budget if self.budget is not None else math.ceil(self.ratio * prompt_len)
        return min(prompt_len, max(want, self.window, 1))

    def slots_needed(self, prompt_len: int, max_new: int, block_size: int = 1) -> int:
        keep = self.kept(prompt_len)   # the prompt and its compressed copy (whole blocks), then the copy and the output
        whole = lambda n: -(-n // block_size) * block_size   # noqa: E731
        return max(whole(prompt_len) + (whole(keep) if keep < prompt_len else 0), keep + max_new)

    def start(self, r) -> None:
        r.kv_state = {"queries": None, "done": False}

    def feed_room(self, r) -> int | None:
        prompt = len(r.prompt_ids)
        if r.num_computed < prompt:   # never feed past the prompt's end before compressing
            return prompt - r.num_computed
        return None

    def observe_queries(self, r, queries) -> None:
        held = r.kv_state.get("queries")
        r.kv_state["queries"] = list(queries) if held is None else [torch.cat((a, b)) for a, b in zip(held, queries)]

    def after_commit(self, r, kv: KVAccess) -> None:
        state = r.kv_state
        prompt = len(r.prompt_ids)
        if state.get("done") or r.num_computed < prompt:
            return
        state["done"] = True
        queries, state["queries"] = state.get("queries"), None
        keep = self.kept(prompt)
        if keep >= prompt or r.kv_shift:
            return
        window = min(self.window, prompt)
        if self.needs_queries and (queries is None or queries[0].shape[0] != window):
            raise RuntimeError(f"{self.name}: expected the queries of the prompt's last {window} tokens, got "
                               f"{None if queries is None else queries[0].shape[0]}")
        bs = kv.pool.block_size
        need = -(-keep // bs)
        blocks = kv.blocks.allocate(need)
        if blocks is None:   # the pool is full: compact in place into the request's own first blocks if it may
            head = r.block_table[:need]
            if any(kv.blocks.ref[b] > 1 for b in head):   # shared with a running request: stay uncompressed
                state["skipped"] = True
                return
            for b in head:
                kv.blocks.forget(b)   # their contents no longer follow from their tokens
            blocks = list(head)
        device = kv.pool.k[0].device
        src = torch.tensor([slot_of(r.block_table, bs, j) for j in range(prompt)], device=device)
        dst = torch.tensor([slot_of(blocks, bs, j) for j in range(keep)], device=device)
        scale = kv.model.config.scale
        for layer in range(len(kv.pool.k)):
            keys = kv.pool.k[layer][0][:, src]                    # [KV, P, D]
            q = queries[layer] if self.needs_queries else None    # [w, H, D]
            idx = self.select(q, keys, keep, scale)               # [KV, keep] token indices, ascending
            slots = src[idx]                                      # [KV, keep] pool slots
            for cache in (kv.pool.k[layer], kv.pool.v[layer]):   # gathered whole before written (in place is safe)
                cache[0][:, dst] = torch.gather(cache[0], 1, slots[..., None].expand(-1, -1, cache.shape[-1]))
        replace_blocks(r, kv, blocks)
        r.kv_shift = prompt - keep
        state["kept"] = keep

    def select(self, queries: torch.Tensor | None, keys: torch.Tensor, keep: int, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def with_window(self, top: torch.Tensor, P: int) -> torch.Tensor:
        """``top [KV, keep - w]`` earlier tokens + the window's ``w`` tokens, sorted: ``[KV, keep]``."""
        w = min(self.window, P)
        window = torch.arange(P - w, P, device=top.device).expand(top.shape[0], w)
        return torch.cat((top, window), dim=-1).sort(dim=-1).values
