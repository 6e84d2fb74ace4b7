"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"): keep the first
``sinks`` tokens (attention sinks) and a window of the most recent tokens; position every token by its slot in the
cache, so generation can run far past the model's trained context without its positions ever leaving it.

``streaming_llm:sinks=4,window=1020,evict=64``. A request holds at most ``sinks + window + evict`` slots: when its
committed slots reach that, the ``evict`` oldest tokens after the sinks are dropped at once (``evict`` a multiple of
the pool's block size: whole blocks leave the block table, no copying but the sinks' few slots) and the keys that
remain are re-rotated to their new slots (rotary by ``-evict``, the same move transformers' SinkCache made). So
each token sees the sinks plus between ``window`` and ``window + evict`` recent tokens; the eviction points depend
on the token count alone, and the scheduler never feeds past one (``feed_room``), which keeps speculative decoding
token-identical to plain decoding under this policy.

Lossy: tokens older than the window are gone (a fact from the start of a long chat is forgotten). What it buys:
bounded memory and attention time per token, and no blow-up past the trained context (the paper's perplexity
stays flat over millions of tokens where dense attention fails at the context length).
"""
from __future__ import annotations

import torch

from ...errors import InvalidParamsError
from ...models.paged import slot_of
from .base import KVAccess, KVPolicy, replace_blocks


class StreamingLLM(KVPolicy):
    name = "streaming_llm"
    relative_positions = True
    prefix_cache = False   # keys are re-rotated in place
    bounded = True

    def __init__(self, sinks: int = 4, window: int = 1020, evict: int = 64) -> None:
        for knob, value, low in (("sinks", sinks, 0), ("window", window, 1), ("evict", evict, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParamsError(f"streaming_llm: {knob} must be an integer >= {low}, got {value!r}")
        self.sinks, self.window, self.evict = sinks, window, evict

    def knobs(self) -> dict:
        return {"sinks": self.sinks, "window": self.window, "evict": self.evict}

    @property
    def limit(self) -> int:
        """Slots held at most: when the committed slots reach it, ``evict`` tokens go."""
        return self.sinks + self.window + self.evict

    def check_model(self, config) -> None:
        super().check_model(config)
        if self.limit > config.max_position_embeddings:
            raise InvalidParamsError(
                f"streaming_llm: sinks + window + evict = {self.limit} positions, more than the model's context of "
                f"{config.max_position_embeddings}; lower window")

    def check_pool(self, block_size: int) -> None:
        if self.evict % block_size:
            raise InvalidParamsError(f"streaming_llm: evict={self.evict} must be a multiple of the KV block size "
                                     f"({block_size}): whole blocks are evicted")

    def slots_needed(self, prompt_len: int, max_new: int, block_size: int = 1) -> int:
        return min(prompt_len + max_new, self.limit)

    def feed_room(self, r) -> int:
        return self.limit - r.num_slots

    def after_commit(self, r, kv: KVAccess) -> None:
        if r.num_slots < self.limit:
            return   # (evict is a multiple of the block size: the engine checked check_pool when it parsed the spec)
        bs, e, s = kv.pool.block_size, self.evict, self.sinks
        # drop logical slots [s, s + e): the first e / bs blocks go, and the sinks (old slots 0..s-1) are copied
        # over what the new first slots held (old slots e..e+s-1, which were to be evicted anyway)
        old = r.block_table
        table = old[e // bs:]
        if s:
            kv.pool.move([slot_of(old, bs, j) for j in range(s)], [slot_of(table, bs, j) for j in range(s)])
        replace_blocks(r, kv, table)
        r.kv_shift += e
        kept = r.num_slots - s
        if kept > 0:
            rerotate(kv, [slot_of(table, bs, j) for j in range(s, s + kept)], -e)


def rerotate(kv: KVAccess, slots: list[int], delta: int) -> None:
    """Move the keys in pool ``slots`` by ``delta`` rotary positions (every layer; values are unrotated).
    ``rot(p + d) = rot(d) rot(p)``: rotating a key by ``d`` more is the same map as rotating it at ``p + d``."""
    model = kv.model
    pool = kv.pool
    index = torch.tensor(slots, dtype=torch.long, device=pool.k[0].device)
    rotary = model.rotary["full"]
    freqs = float(delta) * rotary.inv_freq.float()
    emb = torch.cat((freqs, freqs))
    cos, sin = emb.cos(), emb.sin()   # float32 whatever the pool's dtype: one rounding per re-rotation, not three
    half = cos.shape[0] // 2
    for cache in pool.k:
        keys = cache[0, :, index].float()                               # [KV, n, D]
        rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
        cache[0, :, index] = (keys * cos + rotated * sin).to(cache.dtype)
