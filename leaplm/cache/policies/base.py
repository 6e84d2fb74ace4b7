"""The KV policy contract: what a compression or eviction method tells the engine, and what it may do to a
request's KV.

A ``KVPolicy`` is a parsed spec (``"snapkv:ratio=0.25"``), shared by every request that uses it; per-request state
lives in ``Request.kv_state``. The engine calls it at fixed points of a request's life, always in terms of
*committed tokens*, never of steps, so that what a policy keeps is a function of the token stream alone: the output
under a policy is the same whatever runs beside the request, however its prompt was chunked, and with or without
speculative decoding (verification passes read the same compressed cache that plain decoding reads).

- ``feed_room(r)``: the most tokens (pending + draft) ``r`` may feed in the next step (None: no limit). A policy
  that compresses at a token count caps the feed there, so no pass runs past a compression point.
- ``capture``: how many of the prompt's last tokens' queries (rotated, ``[n, heads, head_dim]`` per layer) the
  policy needs; the runner records them (``observe_queries``) while the prompt is prefilled.
- ``after_commit(r, kv)``: called after every commit; it may rewrite ``r``'s keys/values, replace blocks of its
  block table and raise ``r.kv_shift`` (token ``i`` then lives in logical slot ``i - kv_shift``). ``kv`` gives the
  pool, the block manager and the model (``KVAccess``).

Rotary positions: a policy with ``relative_positions`` (StreamingLLM) positions every token by its slot in the
cache, not by its index in the text, and re-rotates the keys it keeps when it evicts; the others keep the text's
positions. Prefix caching: a policy with ``prefix_cache = False`` neither takes blocks from the prefix cache nor
registers any (it rewrites blocks in place); the others may start from cached prompt blocks and register blocks
until they first compress (after that a block's contents no longer follow from its tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ...errors import InvalidParamsError

if TYPE_CHECKING:
    from ...engine.kv_pool import BlockManager, KVPool
    from ...engine.request import Request


@dataclass
class KVAccess:
    """What a policy may touch: the pool's tensors, the block manager and the model (its config and rotary)."""
    pool: "KVPool"
    blocks: "BlockManager"
    model: Any


class KVPolicy:
    """Base class (the contract in the module docstring). Subclasses set ``name`` and their knobs."""

    name = "none"
    lossy = True
    relative_positions = False
    prefix_cache = True
    bounded = False          # holds a bounded number of slots: prompts and outputs may run past the context window
    capture = 0

    def check_model(self, config) -> None:
        """Refuse a model this policy cannot serve (``InvalidParamsError`` naming why)."""
        if "sliding" in config.layer_types:
            raise InvalidParamsError(
                f"kv_policy {self.spec()!r}: this model has sliding-window attention layers, which already bound "
                "their KV; KV policies support models whose layers all attend globally (Llama, Qwen, Mistral "
                "without a window, SmolLM)")

    def start(self, r: "Request") -> None:
        r.kv_state = {}

    def slots_needed(self, prompt_len: int, max_new: int, block_size: int = 1) -> int:
        """The most KV slots (whole blocks of ``block_size``) a request of this size holds at once (the admission
        check against the pool)."""
        return prompt_len + max_new

    def feed_room(self, r: "Request") -> int | None:
        return None

    def observe_queries(self, r: "Request", queries: list[Tensor]) -> None:
        """The rotated queries ``[n, heads, head_dim]`` (one tensor per layer) of prompt tokens inside the
        ``capture`` window, in token order across calls."""

    def after_commit(self, r: "Request", kv: KVAccess) -> None:
        """Called after each commit (``r.num_computed`` already advanced)."""

    def knobs(self) -> dict[str, Any]:
        return {}

    def spec(self) -> str:
        knobs = self.knobs()
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in knobs.items()) if knobs else "")

    def __repr__(self) -> str:
        return f"KVPolicy({self.spec()!r})"


def replace_blocks(r: "Request", kv: KVAccess, table: list[int]) -> None:
    """Give ``r`` the block table ``table`` (its new blocks already allocated) and release the old blocks it no longer
    lists; tracks the request's peak number of blocks."""
    old, new = r.block_table, set(table)
    r.peak_kv_blocks = max(r.peak_kv_blocks, len(set(old) | new))
    r.block_table = table
    kv.blocks.release([b for b in old if b not in new])
