"""The scheduler: which requests feed which tokens in the next step, under a token budget and a memory budget.

Each step (``schedule()``):

1. **Running requests, oldest first.** A request whose pending tokens fit (``<= prefill_chunk``) feeds them all
   plus a draft (*decode*): one token each comes first, so every running stream advances every step; a request
   still prefilling a long prompt feeds one chunk of it (``prefill_chunk`` tokens at most) from what is left of the
   budget. Draft tokens come last, from what is left (``draft_budget``).
2. **Waiting requests, first come first served** (preempted ones first: they arrived earlier), while fewer than
   ``max_num_seqs`` run and budget is left: its cached prefix blocks are taken from the prefix cache, then its first
   chunk is scheduled. A waiting request that does not fit waits; later ones do not pass it (no starvation).
3. **Memory.** Every scheduled feed needs blocks for its slots. When the pool is out of free blocks, the newest
   running request is *preempted*: its blocks are released (full ones stay in the prefix cache), it goes back to
   the head of the waiting queue and its tokens are recomputed when it is admitted again. Its output is unchanged.

``max_num_batched_tokens`` bounds the tokens of one step (prefill chunks + pending + drafts): it bounds how long a
prompt can stall the running streams (one chunk's time).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .kv_pool import BlockManager
from .request import Request, Status


@dataclass
class Scheduled:
    """One request's share of a step: feed ``tokens[num_computed : num_computed + take]``, then (when that reaches
    the end of its tokens) a draft of at most ``draft_budget`` tokens."""
    request: Request
    take: int
    draft_budget: int = 0

    @property
    def reaches_end(self) -> bool:
        return self.take == self.request.num_pending


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, prefill_chunk: int,
                 plan_drafts: Callable[[list[Request], list[int], int, int, int], list[int]] | None = None) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        # (requests, caps, step tokens, step yield, budget) -> draft tokens each (goodput.py); None: the caps
        self.plan_drafts = plan_drafts
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # in arrival order
        self.preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and give its blocks back."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ the step's plan
    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        items: list[Scheduled] = []
        decoding = [r for r in self.running if r.num_pending <= self.prefill_chunk]
        prefilling = [r for r in self.running if r.num_pending > self.prefill_chunk]
        for r in decoding:   # every running stream advances
            take = feed_cap(r, r.num_pending)
            if budget < take:
                break
            items.append(Scheduled(r, take))
            budget -= take
        for r in prefilling:
            if budget <= 0:
                break
            take = feed_cap(r, min(r.num_pending, self.prefill_chunk, budget))
            items.append(Scheduled(r, take))
            budget -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if not r.block_table:
                self._match_prefix(r)
            take = feed_cap(r, min(r.num_pending, self.prefill_chunk, budget))
            if not self._ensure(r, r.num_slots + take):
                self._release(r)
                break
            self.waiting.popleft()
            r.status = Status.RUNNING
            self.running.append(r)
            items.append(Scheduled(r, take))
            budget -= take
        # drafts from what is left of the budget
        decoders = [it for it in items if it.reaches_end and it.request.decoding and it.request.drafter is not None]
        if decoders and budget > 0:
            caps = [draft_cap(it.request) for it in decoders]
            if self.plan_drafts is None:
                shares = []
                for cap in caps:
                    shares.append(max(0, min(cap, budget - sum(shares))))
            else:
                shares = self.plan_drafts([it.request for it in decoders], caps,
                                          self.max_num_batched_tokens - budget,
                                          sum(1 for it in items if it.reaches_end), budget)
            for it, share in zip(decoders, shares):
                it.draft_budget = share
        return self._fit(items)

    def _fit(self, items: list[Scheduled]) -> list[Scheduled]:
        """Give every item the blocks its feed and draft need, preempting the newest running requests (and
        dropping their items, wherever they are in the list) when the pool runs out."""
        for it in items:
            r = it.request
            if r.status is not Status.RUNNING:   # preempted for an earlier item
                continue
            while not self._ensure(r, r.num_slots + it.take + it.draft_budget):
                if it.draft_budget:   # first give up the draft
                    it.draft_budget = 0
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is r:
                    break
        return [it for it in items if it.request.status is Status.RUNNING]

    # ------------------------------------------------------------------ memory
    def _ensure(self, r: Request, slots: int) -> bool:
        """Grow ``r``'s block table to cover ``slots`` logical slots; False (nothing taken) if the pool is short."""
        need = -(-slots // self.block_size) - len(r.block_table)
        if need <= 0:
            return True
        blocks = self.blocks.allocate(need)
        if blocks is None:
            return False
        r.block_table += blocks
        r.peak_kv_blocks = max(r.peak_kv_blocks, len(r.block_table))
        return True

    def _match_prefix(self, r: Request) -> None:
        """Start ``r`` from the longest run of its leading full blocks found in the prefix cache (never its last
        token: the step that feeds it produces the next token's logits). Not for a KV policy that rewrites its blocks
        in place."""
        if (r.kv_policy is not None and not r.kv_policy.prefix_cache) or r.prompt_logprobs is not None:
            return   # a policy that rewrites blocks in place; a prompt whose every token is to be scored
        limit = len(r.tokens) - 1
        if r.kv_policy is not None:   # never past the prompt (a compression point), and the policy's window of
            #                           prompt queries is recomputed
            limit = min(limit, len(r.prompt_ids) - max(r.kv_policy.capture, 1))
        blocks, hashes = self.blocks.match_prefix(r.tokens, max(0, limit))
        r.block_table, r.block_hashes = blocks, hashes
        r.num_computed = len(blocks) * self.block_size
        r.cached_tokens = min(r.num_computed, len(r.prompt_ids))

    def _release(self, r: Request) -> None:
        self.blocks.release(r.block_table)
        r.block_table, r.block_hashes = [], []
        r.num_computed = 0

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self._release(r)
        if r.kv_policy is not None:   # recomputed from the start: the policy starts over too
            r.kv_shift = 0
            r.kv_policy.start(r)
        r.status = Status.WAITING
        r.preemptions += 1
        self.preemptions += 1
        # back to the head of the queue, in arrival order among the preempted
        index = 0
        while index < len(self.waiting) and self.waiting[index].arrival <= r.arrival:
            index += 1
        self.waiting.insert(index, r)


def feed_cap(r: Request, take: int) -> int:
    """``take`` within what ``r``'s KV policy lets it feed before its next compression point."""
    room = r.kv_policy.feed_room(r) if r.kv_policy is not None else None
    return take if room is None else max(1, min(take, room))


def draft_cap(r: Request) -> int:
    """The most draft tokens ``r`` may take: its drafter's ``num_draft``, within the tokens it may still generate
    (a verdict adds the accepted tokens + 1) and before its KV policy's next compression point."""
    room = r.max_new - len(r.output_ids) - 1
    if r.kv_policy is not None:
        feed = r.kv_policy.feed_room(r)
        if feed is not None:
            room = min(room, feed - r.num_pending)
    return max(0, min(r.drafter.num_draft, room))
