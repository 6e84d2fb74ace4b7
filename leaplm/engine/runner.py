"""The runner: drafts, builds the step's flat pass over the paged pool, runs the model.

``Runner(model, pool, constrain).run(items) -> StepResult``. For every scheduled request that feeds all its pending
tokens and is decoding, its drafter proposes (``Drafter.propose(request_id, tokens, budget)``); a constrained
request's draft is pruned and its masks computed (``constrain``). Then one ``PagedStep`` per pass:

- an eager model: one pass with every fed token;
- a compiled model (``Transformer.compile``): prompt tokens go through an eager pass and output tokens (pending,
  jump-forward, drafts) through the compiled one, the eager pass first. Which pass a token takes depends only on its
  own request (is it a prompt token?), never on the other requests, so a request's keys, values and logits are what
  they are when it runs alone; the compiled pass reproduces single-token decoding bit for bit.

Each request reaching its end gets the logits of its last pending token and its draft tokens (and, when its drafter
observes the target's top tokens, of every pending token).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..models.paged import PagedStep, Segment
from ..speculative.drafters.base import Draft
from ..speculative.tree import chain_parents, check_tree, depths
from .kv_pool import KVPool
from .request import Request
from .scheduler import Scheduled
from .structured import feed_parents


@dataclass
class StepResult:
    started: float
    drafts: dict[int, Draft] = field(default_factory=dict)
    logits: dict[int, Tensor] = field(default_factory=dict)        # request id -> [rows, V]
    first_row: dict[int, int] = field(default_factory=dict)        # request id -> feed index of logits row 0
    observe: dict[int, tuple[list[int], tuple[int, int]]] = field(default_factory=dict)  # fed tokens, feed rows
    draft_s: dict[int, float] = field(default_factory=dict)         # request id -> seconds its drafter took
    hidden: dict[int, list[tuple[int, Tensor]]] = field(default_factory=dict)   # request id -> (first feed index,
    #                                                                   final hidden states [n, H]) per pass
    prompt_logits: dict[int, tuple[int, Tensor]] = field(default_factory=dict)   # request id -> (token index of row
    #                                                                   0, logits [n, V]) of prompt tokens (prompt_logprobs)
    captured: dict[int, list[Tensor]] = field(default_factory=dict)  # request id -> per layer queries [n, H, D] of
    #                                                                   the prompt tokens its KV policy watches


@dataclass
class _Part:
    """One request's tokens in one pass."""
    request: Request
    base: int                      # logical slot of its first token here
    feed_start: int                # feed index of its first token here
    tokens: list[int]
    positions: list[int]
    parents: list[int] | None      # tree parents (feed_parents numbering), only for a whole decode feed
    rows: tuple[int, int] | None   # feed rows whose logits are wanted, if they lie in this part
    hidden: bool = False           # its drafter wants the final hidden states of these tokens
    capture: tuple[int, int] | None = None   # its KV policy wants the queries of these part indices
    prompt_rows: int = 0           # its first ``prompt_rows`` tokens are prompt tokens whose logits are wanted


class Runner:
    def __init__(self, model, pool: KVPool, constrain: Callable[[Request, Draft], Draft], goodput=None) -> None:
        self.model = model
        self.pool = pool
        self.constrain = constrain
        self.goodput = goodput   # told the size and time of the passes drafts go through
        self.window = model.config.sliding_window if "sliding" in model.config.layer_types else None

    def run(self, items: list[Scheduled]) -> StepResult:
        result = StepResult(started=time.perf_counter())
        eager: list[_Part] = []
        compiled: list[_Part] = []
        split = self.model.compiled is not None
        proposed = self._propose(items, result)
        for it in items:
            r = it.request
            draft = self._check(it, proposed.get(r.request_id, Draft([])))
            result.drafts[r.request_id] = draft
            nc, take = r.num_computed, it.take
            slot = nc - r.kv_shift           # logical slot of the first fed token
            first = r.position_of(nc)        # its rotary position
            fed_tokens = r.tokens[nc: nc + take] + list(draft.tokens)
            parents = None
            positions = list(range(first, first + take))
            if draft.is_tree:
                parents = feed_parents(take, draft)
                positions = [first] + [first + d for d in depths(parents)]
            else:
                positions += list(range(first + take, first + take + len(draft.tokens)))
            rows = None
            if it.reaches_end:
                observing = r.drafter is not None and r.drafter.observe_topk and r.decoding
                first = 0 if observing else take - 1
                rows = (first, len(fed_tokens))
                result.first_row[r.request_id] = first
                if r.drafter is not None and r.drafter.observe_topk:
                    seen = fed_tokens if observing else [fed_tokens[take - 1]]
                    result.observe[r.request_id] = (seen, (take - 1, take) if not observing else rows)
            # a compiled model: prompt tokens in the eager pass, output tokens in the compiled one. The wanted rows
            # (the last pending token on) are then output tokens too, unless nothing is compiled.
            cut = max(0, min(len(fed_tokens), len(r.prompt_ids) - nc)) if split else len(fed_tokens)
            whole = cut == len(fed_tokens)
            hidden = r.drafter is not None and r.drafter.needs_hidden
            capture = None
            if r.kv_policy is not None and r.kv_policy.capture:   # prompt tokens in the policy's window
                prompt = len(r.prompt_ids)
                lo, hi = max(prompt - r.kv_policy.capture, nc), min(prompt, nc + take)
                capture = (lo - nc, hi - nc) if hi > lo else None
                if capture is not None and split and hi - nc > cut:
                    raise RuntimeError("a KV policy's captured prompt queries must go through the eager pass")
            scored = 0   # prompt tokens whose next-token logits prompt_logprobs wants (all fed ones but the last)
            if r.prompt_logprobs is not None and nc < len(r.prompt_ids) - 1:
                scored = min(take, len(r.prompt_ids) - 1 - nc)
                if split and scored > cut:
                    raise RuntimeError("prompt_logprobs rows must go through the eager pass")
            if cut:
                eager.append(_Part(r, slot, 0, fed_tokens[:cut], positions[:cut], parents if whole else None,
                                   rows if whole else None, hidden, capture, scored))
            if not whole:
                assert rows is None or rows[0] >= cut, "a request's verified rows straddle its two passes"
                compiled.append(_Part(r, slot + cut, cut, fed_tokens[cut:], positions[cut:],
                                      parents if cut == 0 else None, rows, hidden))
        if eager:
            self._pass(eager, result, compiled=False)
        if compiled:
            self._pass(compiled, result, compiled=True)
        return result

    # ------------------------------------------------------------------ drafting
    def _propose(self, items: list[Scheduled], result: StepResult) -> dict[int, Draft]:
        """Every speculating request's draft, one ``propose_batch`` call per drafter (request id -> draft). A
        batch call's time is shared evenly by its requests (``draft_s``)."""
        by_drafter: dict[int, list[Scheduled]] = {}
        for it in items:
            r = it.request
            if it.reaches_end and it.draft_budget > 0 and r.drafter is not None and r.decoding:
                by_drafter.setdefault(id(r.drafter), []).append(it)
        drafts: dict[int, Draft] = {}
        for group in by_drafter.values():
            drafter = group[0].request.drafter
            t = time.perf_counter()
            rows, contexts, ks = ([it.request.request_id for it in group], [it.request.tokens for it in group],
                                  [it.draft_budget for it in group])
            if getattr(type(drafter), "propose_batch", None) is not None:
                out = drafter.propose_batch(rows, contexts, ks)
            else:   # an object that only drafts like a Drafter (a wrapper): its own propose, one by one
                out = [drafter.propose(row, context, k) for row, context, k in zip(rows, contexts, ks)]
            share = (time.perf_counter() - t) / len(group)
            if len(out) != len(group):
                raise ValueError(f"{drafter.name} returned {len(out)} drafts for {len(group)} requests")
            for it, draft in zip(group, out):
                r = it.request
                result.draft_s[r.request_id] = share
                r.draft_s += share
                if len(draft.tokens) > it.draft_budget:
                    raise ValueError(f"{drafter.name} drafted {len(draft.tokens)} tokens, more than the "
                                     f"{it.draft_budget} asked for")
                drafts[r.request_id] = draft
        return drafts

    def _check(self, it: Scheduled, draft: Draft) -> Draft:
        """A tree is checked (and sent as a chain when it is one); a constrained request's draft is pruned to its
        grammar and its masks filled (also with no draft: the masks apply to the verified token)."""
        r = it.request
        if not it.reaches_end:
            return Draft([])
        if draft.is_tree:
            check_tree(draft.tokens, draft.parents)
            room = r.max_new - len(r.output_ids) - 1
            if max(depths(draft.parents), default=0) > room:
                raise ValueError(f"{r.drafter.name} drafted a tree deeper than the {room} tokens left")
            if draft.parents == chain_parents(len(draft.parents)):   # a chain after all (no tree mask)
                draft = Draft(draft.tokens, draft.probs)
        if r.constraint is not None:
            draft = self.constrain(r, draft)
        return draft

    # ------------------------------------------------------------------ passes
    def _pass(self, parts: list[_Part], result: StepResult, compiled: bool) -> None:
        device = self.model.device
        segments = [Segment(p.request.block_table, p.base, p.positions, p.parents) for p in parts]
        step = PagedStep(segments, self.pool.block_size, self.window, device)
        if not compiled:
            step.capture = {p.request.request_id: (step.starts[i] + p.capture[0], step.starts[i] + p.capture[1])
                            for i, p in enumerate(parts) if p.capture is not None}
        tokens = torch.tensor([t for p in parts for t in p.tokens], dtype=torch.long, device=device)
        index: list[int] = []
        hidden_index: list[int] = []
        wanted: list[tuple[_Part, int, int]] = []   # part, first row in the logits, count
        hidden_of: list[tuple[_Part, int]] = []     # part, first row in the hidden states
        scored: list[tuple[_Part, int]] = []        # part, first row of its prompt_logprobs rows
        offset = 0
        for p in parts:
            if p.prompt_rows:
                scored.append((p, len(index)))
                index += range(offset, offset + p.prompt_rows)
            if p.rows is not None:
                lo, hi = p.rows[0] - p.feed_start, p.rows[1] - p.feed_start
                wanted.append((p, len(index), hi - lo))
                index += range(offset + lo, offset + hi)
            if p.hidden:
                hidden_of.append((p, len(hidden_index)))
                hidden_index += range(offset, offset + len(p.tokens))
            offset += len(p.tokens)
        hidden_rows = torch.tensor(hidden_index, dtype=torch.long, device=device) if hidden_of else None
        if not wanted and not scored and compiled and hidden_rows is None:
            self._run(tokens, step, None, compiled, None)
            return
        out = self._run(tokens, step, torch.tensor(index, dtype=torch.long, device=device), compiled, hidden_rows)
        logits, hidden = out if hidden_rows is not None else (out, None)
        for p, start, count in wanted:
            result.logits[p.request.request_id] = logits[start: start + count]
            result.first_row[p.request.request_id] = p.rows[0]
        for p, start in scored:
            result.prompt_logits[p.request.request_id] = (p.request.num_computed, logits[start: start + p.prompt_rows])
        for p, start in hidden_of:
            result.hidden.setdefault(p.request.request_id, []).append(
                (p.feed_start, hidden[start: start + len(p.tokens)]))
        result.captured.update(step.captured)

    def _run(self, tokens: Tensor, step: PagedStep, logit_index: Tensor | None, compiled: bool,
             hidden_index: Tensor | None):
        t = time.perf_counter()
        out = self.model.forward_paged(tokens, step.positions[0], self.pool, step, logit_index, compiled=compiled,
                                       hidden_index=hidden_index)
        # drafts go through the compiled pass of a compiled model, else the eager one: that pass's cost is what
        # a draft token adds
        if self.goodput is not None and compiled == (self.model.compiled is not None):
            self.goodput.observe_pass(len(tokens), time.perf_counter() - t)
        return out
