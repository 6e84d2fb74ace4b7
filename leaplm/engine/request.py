"""``Request``: everything the engine knows about one request, in one place.

Tokens: ``tokens`` is the prompt followed by the output so far (``prompt_ids + output_ids``, kept as one list).
KV: ``block_table`` (``kv_pool.py``) and ``num_computed``, the number of ``tokens`` whose keys and values are
committed (logical slots ``0 .. num_slots - 1``; ``num_slots = num_computed - kv_shift``, the tokens a KV policy
dropped, ``cache/policies``). The tokens past it are *pending*: the prompt's rest while it is
prefilled (in chunks), then normally the one token sampled last; jump-forward adds the tokens a grammar forces, and
a preempted request pends all its tokens again (they are recomputed, bit for bit the same). A step feeds pending
tokens (all of them, or a prefill chunk) and, when it feeds them all, the request's draft.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..sampling import SamplingParams, TokenHistory

if TYPE_CHECKING:
    from ..cache.policies.base import KVPolicy
    from ..constrain.base import Constraint
    from ..speculative.drafters.base import Drafter


@dataclass
class TokenLogprob:
    """One output token's log-probability (``SamplingParams.logprobs``) and the ``k`` likeliest tokens' at its
    position, ``[(token_id, logprob), ...]`` best first (-inf, a token the grammar forbids, is left out)."""
    logprob: float
    top: list[tuple[int, float]]


class Status(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted (no blocks)
    RUNNING = "running"      # holds blocks, scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int                      # max_tokens, clipped to the room left in the context window
    generator: torch.Generator | None
    history: TokenHistory | None
    constraint: "Constraint | None" = None   # structured output: the grammar's cursor after output_ids
    drafter: "Drafter | None" = None          # speculation for this request (its state keyed by request_id)
    arrival: float = 0.0              # perf_counter() at add_request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    status: Status = Status.WAITING
    # timing and statistics (LLM reports them as RequestOutput.metrics)
    started: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    target_passes: int = 0
    drafted: int = 0                  # draft tokens proposed to the target
    accepted: int = 0                 # draft tokens the target accepted
    draft_s: float = 0.0              # time spent drafting
    verify_s: float = 0.0             # time spent in target passes + verification
    forced_tokens: int = 0            # tokens appended by jump-forward (forced by the grammar, never sampled)
    pruned: int = 0                   # draft tokens dropped before verification because the grammar rejects them
    constraint_s: float = 0.0         # time in the constraint: masks, pruning drafts, advancing, jump-forward
    mask_times: list[float] = field(default_factory=list)   # seconds per next-token mask computed
    cached_tokens: int = 0            # prompt tokens found in the prefix cache (at the last admission)
    preemptions: int = 0              # times its blocks were taken back and its tokens recomputed
    logprobs: list[TokenLogprob] | None = None   # one per output token when params.logprobs is not None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # one per prompt token (the first: None) when asked
    # KV
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # prefix hashes of its first full committed blocks
    num_computed: int = 0
    kv_policy: "KVPolicy | None" = None   # KV compression / eviction for this request (``cache/policies``)
    kv_shift: int = 0                 # tokens whose KV the policy dropped: token i (held) lives in logical slot i - kv_shift
    kv_state: dict = field(default_factory=dict)   # the policy's per-request state
    peak_kv_blocks: int = 0           # most KV blocks held at once (RequestOutput.metrics["kv_cache_bytes"])
    final_kv_blocks: int = 0          # KV blocks held when it finished
    kv_block_bytes: int = 0           # bytes of one KV block (all layers, keys and values)
    keep_kv: bool = False             # copy its committed keys/values into final_kv when it finishes (tests)
    final_kv: list | None = None      # per layer (k, v) [1, kv_heads, length, D], when keep_kv
    # per step
    masks: Tensor | None = None       # int32 [>= 1 + n, W]: this step's grammar masks
    emitted: int = 0                  # output tokens already returned by step()
    finish_emitted: bool = False

    def __post_init__(self) -> None:
        self.tokens: list[int] = list(self.prompt_ids) + list(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_slots(self) -> int:
        """Committed logical KV slots: ``num_computed`` less the tokens a KV policy dropped."""
        return self.num_computed - self.kv_shift

    def position_of(self, index: int) -> int:
        """The rotary position of token ``index``: the index itself, or its slot under a policy that positions
        tokens within the cache (StreamingLLM)."""
        if self.kv_policy is not None and self.kv_policy.relative_positions:
            return index - self.kv_shift
        return index

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.num_computed:]

    @property
    def decoding(self) -> bool:
        """Whether every pending token is an output token (the prompt is committed): drafts are allowed."""
        return self.num_computed >= len(self.prompt_ids)
