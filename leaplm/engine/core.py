"""``LLMEngine``: the long-lived generation engine. It knows token ids, never text (stop strings live in ``llm.py``).

    engine = LLMEngine(model, eos_token_ids)
    rid = engine.add_request(prompt_ids, SamplingParams(...), speculative=drafter_or_None)
    while engine.has_unfinished():
        for out in engine.step():          # StepOutput(request_id, new_token_ids, finish_reason)
            ...
    engine.abort(rid)                      # at any time: its blocks are freed at once

A step is three calls (vLLM v1's shape): ``Scheduler.schedule`` picks each running request's feed (its pending
tokens, or a prefill chunk) and admits waiting requests under the token and memory budgets; ``runner.run`` drafts,
builds one flat pass (a paged ``PagedStep``) and runs the model; ``_update`` verifies every request's draft against
its logits, commits the accepted tokens (rollback = not committing), registers newly full blocks in the prefix
cache, applies stop rules and jump-forward, and frees finished requests' blocks.

Exactness: a request's tokens, keys and values never depend on what else runs: the int8/int4 (and float32, when
native) matmuls are row-invariant, attention is computed per query over exactly the request's own slots, and the
prompt/output split of a compiled model's passes depends only on the request. So its greedy output equals what it
produces alone, whatever arrives, leaves, is preempted or shares its prefix.

Speculation per request: ``add_request(..., speculative=drafter)`` (a ``Drafter``; its per-request state is keyed
by the request id). One target pass verifies every request's draft; acceptance is per request (ragged).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..constrain.base import Constraint, apply_bitmask_, bitmask_width
from ..errors import ConstraintError, InvalidParamsError, PromptTooLongError
from ..sampling import SamplingParams, TokenHistory, make_generator, top_ids
from ..speculative.drafters.base import Draft, Drafter
from ..speculative.tree import compaction
from ..speculative.verify import (target_argmax, target_probabilities, verify_greedy, verify_sampling,
                                  verify_tree_greedy, verify_tree_sampling, verify_typical)
from .batch import Batch
from .goodput import GoodputController
from ..cache.policies import KVAccess, KVPolicy, parse_kv_policy
from .kv_pool import BlockManager, KVPool, slot_of
from .request import Request, Status, TokenLogprob
from .runner import Runner, StepResult
from .scheduler import Scheduler
from .structured import clear_ids, constrain_draft


@dataclass
class StepOutput:
    """What one request gained in a step. ``row`` is the request's index in a ``Batch`` (``start``), else its id."""
    request_id: int
    new_token_ids: list[int]
    finish_reason: str | None
    row: int = -1


DEFAULT_BLOCK_SIZE = 16


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits [V]`` (raw, grammar-masked) and the ``k`` likeliest tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k:
        values, ids = torch.topk(lp, k)
        top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
    return TokenLogprob(float(lp[token]), top)


def default_kv_memory(bytes_per_token: int, max_num_seqs: int, max_model_len: int) -> int:
    """Bytes for the KV pool when none is given: a quarter of the memory available now, at most what
    ``max_num_seqs`` full-length requests need, at least one full-length request's worth."""
    available = _available_memory()
    most = bytes_per_token * max_num_seqs * max_model_len
    least = bytes_per_token * max_model_len
    return max(least, min(most, available // 4))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


class LLMEngine:
    """Serves many requests at once on one model (see the module docstring).

    Args:
        model: a ``leaplm.models.transformer.Transformer``.
        eos_token_ids: ids that end a request (unless its params say ``ignore_eos``).
        max_model_len: prompt + output cap (default and upper bound: the model's context window).
        prefill_chunk: most prompt tokens one request feeds in a step.
        constrainer: ``fn(params) -> Constraint``, a fresh grammar cursor for a request that asks for structured
            output (``LLM`` passes one that compiles with its tokenizer). None: such requests need ``constraint=``.
        max_num_seqs: most requests running (holding KV blocks) at once.
        max_num_batched_tokens: most tokens in one step (prefill chunks + pending tokens + drafts).
        kv_cache_memory: bytes for the paged KV pool (default ``default_kv_memory``).
        block_size: slots per KV block (the prefix cache's granularity).
        prefix_caching: reuse full blocks of identical token prefixes across requests.
        drafter_factory: ``fn(spec) -> Drafter`` for ``add_request(speculative=<name or dict>)``.
        goodput: size each request's draft by measured cost and acceptance (``goodput.py``), so that speculation
            never lowers throughput as the batch grows; False: every drafter drafts its own ``num_draft``.
        reserve_kv_memory: write the whole KV pool at start so that it is resident from then on (``KVPool``);
            False: memory grows with the blocks in use, up to the pool's size.
        kv_policy: the KV compression / eviction policy of requests whose ``SamplingParams.kv_policy`` is None
            (``cache/policies``: ``"snapkv:ratio=0.25"``, ``"streaming_llm:window=1020"``; None: keep every token).
    """

    def __init__(self, model, eos_token_ids: Sequence[int] = (), max_model_len: int | None = None,
                 prefill_chunk: int = 512, constrainer: Callable[[SamplingParams], Constraint] | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 prefix_caching: bool = True, drafter_factory: Callable[[object], Drafter | None] | None = None,
                 goodput: bool = True, reserve_kv_memory: bool = False, kv_policy=None) -> None:
        self.model = model
        self.config = model.config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        for name, value, low in (("prefill_chunk", prefill_chunk, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("block_size", block_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParamsError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(prefill_chunk, max_num_seqs) + max_num_seqs
        if isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int) \
                or max_num_batched_tokens < max_num_seqs:
            raise InvalidParamsError(f"max_num_batched_tokens must be an integer >= max_num_seqs ({max_num_seqs}), "
                                     f"got {max_num_batched_tokens!r}")
        self.prefill_chunk = prefill_chunk
        self.constrainer = constrainer
        self.drafter_factory = drafter_factory
        per_token = KVPool.bytes_per_token(self.config, model.dtype)
        if kv_cache_memory is None:
            kv_cache_memory = default_kv_memory(per_token, max_num_seqs, self.max_model_len)
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
            raise InvalidParamsError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        num_blocks = kv_cache_memory // (per_token * block_size)
        if num_blocks < 1:
            raise InvalidParamsError(f"kv_cache_memory={kv_cache_memory} bytes holds no KV block ({block_size} tokens "
                                     f"x {per_token} bytes); give at least {per_token * block_size}")
        self.kv_cache_memory = num_blocks * block_size * per_token
        self.pool = KVPool(self.config, num_blocks, block_size, model.dtype, model.device,
                           reserve=bool(reserve_kv_memory))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.goodput = GoodputController() if goodput else None
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, prefill_chunk,
                                   self.goodput.budgets if goodput else None)
        self.runner = Runner(model, self.pool, self.constrain, self.goodput)
        self.kv_policy = self._policy(kv_policy)
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ requests
    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_slots

    def _policy(self, spec) -> KVPolicy | None:
        """A parsed KV policy checked against this model and pool (None: keep every token)."""
        policy = parse_kv_policy(spec)
        if policy is not None:
            policy.check_model(self.config)
            check_pool = getattr(policy, "check_pool", None)
            if check_pool is not None:
                check_pool(self.block_size)
        return policy

    def policy_for(self, params: SamplingParams) -> KVPolicy | None:
        """The KV policy a request with ``params`` runs under (its own, else the engine's default)."""
        return self.kv_policy if params.kv_policy is None else self._policy(params.kv_policy)

    def check_prompt(self, prompt_ids: Sequence[int], bounded: bool = False) -> None:
        """Refuse an empty prompt, an unknown token id, or (unless a ``bounded`` KV policy holds the request) one
        that leaves no room in the context window."""
        if len(prompt_ids) == 0:
            raise InvalidParamsError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len and not bounded:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the context window is {self.max_model_len} "
                f"tokens (prompt + at least one generated token must fit); shorten the prompt"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidParamsError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")

    def constraint_for(self, params: SamplingParams, given: Constraint | None = None) -> Constraint | None:
        """The request's grammar cursor: ``given``, else one from the constrainer when ``params`` ask for one."""
        c = given
        if c is None and params.constraint is not None:
            if self.constrainer is None:
                raise InvalidParamsError(
                    "structured output (json_schema / regex / grammar / json_object) needs the model's tokenizer "
                    "to compile the grammar: use leaplm.LLM, or give the Engine a constrainer")
            c = self.constrainer(params)
        if c is not None and c.vocab_size != self.config.vocab_size:
            raise InvalidParamsError(f"the constraint masks {c.vocab_size} token ids but the model has "
                                     f"{self.config.vocab_size} logits; compile it with vocab_size={self.config.vocab_size}")
        return c

    def _drafter(self, speculative) -> Drafter | None:
        if speculative is None or isinstance(speculative, Drafter) or hasattr(speculative, "propose"):
            return speculative   # a drafter (or an object that drafts like one)
        if speculative == "none":
            return None
        if self.drafter_factory is not None:
            return self.drafter_factory(speculative)
        from ..speculative.drafters import make_drafter

        drafter = make_drafter(speculative)
        if drafter is not None:
            drafter.bind(self.model)
        return drafter

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    speculative: Drafter | str | dict | None = None, constraint: Constraint | None = None) -> int:
        """Queue a request; returns its id. Raises (before queueing anything) for an empty or too long prompt, an
        unknown token id, a grammar that does not compile, or a request the KV pool can never hold."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidParamsError(f"params must be a SamplingParams, not {type(params).__name__}")
        prompt_ids = [int(t) for t in prompt_ids]
        policy = self.policy_for(params)
        bounded = policy is not None and policy.bounded
        self.check_prompt(prompt_ids, bounded)
        cursor = self.constraint_for(params, constraint)
        drafter = self._drafter(speculative)
        # a bounded policy positions tokens within its cache: the output may run past the context window
        max_new = params.max_tokens if bounded else min(params.max_tokens, self.max_model_len - len(prompt_ids))
        slack = drafter.num_draft if drafter is not None else 0
        need = (len(prompt_ids) + max_new if policy is None else policy.slots_needed(len(prompt_ids), max_new, self.block_size)) + slack
        if need > self.capacity_tokens:
            raise InvalidParamsError(
                f"the request needs up to {need} KV slots (prompt {len(prompt_ids)} + "
                f"max_tokens {max_new}{f' + draft {slack}' if slack else ''}"
                f"{f' under kv_policy {policy.spec()}' if policy is not None else ''}) but the KV pool holds "
                f"{self.capacity_tokens}; raise kv_cache_memory or lower max_tokens")
        rid = next(self._ids)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        device = self.model.device
        r = Request(rid, prompt_ids, params, frozenset(stop), max_new,
                    generator=None if params.greedy else make_generator(params.seed, device),
                    history=TokenHistory(self.config.vocab_size, prompt_ids, device) if params.uses_penalties else None,
                    constraint=cursor, drafter=drafter, arrival=time.perf_counter())
        r.started = r.arrival
        r.kv_block_bytes = self.block_size * KVPool.bytes_per_token(self.config, self.model.dtype)
        if policy is not None:
            r.kv_policy = policy
            policy.start(r)
        if params.logprobs is not None:
            r.logprobs = []
        if params.prompt_logprobs is not None:
            r.prompt_logprobs = [None]
        if drafter is not None:
            drafter.start(rid, params)
        self.requests[rid] = r
        if cursor is not None:   # the grammar's forced start goes into the prefill
            self._jump_forward(r)
        if r.finished:
            self._retire(r)
        else:
            self.scheduler.add(r)
        return rid

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], drafter=None,
              constraints: Sequence[Constraint | None] | None = None, keep_kv: bool = False) -> Batch:
        """Add a group of requests and return them as a ``Batch``. Every prompt is checked and every grammar compiled
        before any request is added. ``constraints``: one ready grammar cursor (or None) per prompt. ``keep_kv``: each
        request keeps a copy of its committed keys and values when it finishes (``Batch.kv_snapshot``, tests)."""
        if len(prompts) != len(params):
            raise InvalidParamsError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        if constraints is not None and len(constraints) != len(prompts):
            raise InvalidParamsError(f"{len(prompts)} prompts but {len(constraints)} constraints")
        for ids, p in zip(prompts, params):
            policy = self.policy_for(p)
            self.check_prompt(ids, policy is not None and policy.bounded)
        cursors = [self.constraint_for(p, constraints[i] if constraints is not None else None)
                   for i, p in enumerate(params)]
        ids = [self.add_request(list(p_ids), p, speculative=drafter, constraint=c)
               for p_ids, p, c in zip(prompts, params, cursors)]
        for rid in ids:
            self.requests[rid].keep_kv = keep_kv
        return Batch(self, ids, drafter)

    def abort(self, request_id: int) -> None:
        """Stop a request now (finish reason ``"abort"``); its blocks are freed. Unknown or finished ids: no-op."""
        r = self.requests.get(request_id)
        if r is None or r.finished:
            return
        self._finish(r, "abort")
        r.finish_emitted = True   # nothing more is reported for it
        self._retire(r)

    def finish_request(self, request_id: int, keep: int | None = None, reason: str = "stop") -> None:
        """End a request early (e.g. a stop string found in its text), keeping its first ``keep`` output tokens
        (default all): a speculative step may have accepted tokens past the stop."""
        r = self.requests[request_id]
        if keep is not None:
            if not 0 <= keep <= len(r.output_ids):
                raise ValueError(f"cannot keep {keep} of request {request_id}'s {len(r.output_ids)} output tokens")
            del r.output_ids[keep:]
            del r.tokens[len(r.prompt_ids) + keep:]
            if r.logprobs is not None:
                del r.logprobs[keep:]
        was = r.finished
        self._finish(r, reason)
        r.finish_reason = reason
        if not was:
            self._retire(r)

    def get_request(self, request_id: int) -> Request:
        return self.requests[request_id]

    def release(self, request_id: int) -> Request | None:
        """Forget a finished request (the engine keeps them until released, so callers can read their stats)."""
        r = self.requests.get(request_id)
        if r is not None and r.finished:
            return self.requests.pop(request_id)
        return None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. between benchmark runs); blocks in use are untouched."""
        self.blocks.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or any(
            r.finished and not r.finish_emitted for r in self.requests.values())

    def stats(self) -> dict:
        return {"kv_blocks_total": self.blocks.num_blocks, "kv_blocks_free": self.blocks.free_blocks,
                "kv_blocks_used": self.blocks.used_blocks, "kv_blocks_touched": self.blocks.touched_blocks,
                "block_size": self.block_size,
                "kv_cache_memory": self.kv_cache_memory, "kv_reserved": self.pool.reserved,
                "prefix_cache_hit_rate": self.blocks.hit_rate,
                "prefix_cache_queries": self.blocks.queries, "prefix_cache_hits": self.blocks.hits,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.preemptions, "steps": self.steps,
                "tokens_generated": self.tokens_generated}

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepOutput]:
        """Run one step: every running request advances (or its prompt by one chunk); returns what each request
        gained, and requests that finished."""
        outputs = self._emit()   # requests finished outside a step (jump-forward at add, abort, finish_request)
        if not self.scheduler.has_unfinished():
            return outputs
        items = self.scheduler.schedule()
        if not items:
            if self.scheduler.running or self.scheduler.waiting:
                head = (self.scheduler.waiting or self.scheduler.running)[0]
                raise RuntimeError(f"the scheduler could not fit request {head.request_id} in an empty step "
                                   f"({self.blocks.free_blocks} free blocks)")
            return outputs
        self.steps += 1
        result = self.runner.run(items)
        for it in items:
            self._update(it, result)
        return outputs + self._emit()

    def _emit(self) -> list[StepOutput]:
        out = []
        done = []
        for r in self.requests.values():
            if r.finish_emitted:
                continue
            new = r.output_ids[r.emitted:]
            if new or r.finished:
                if new and r.first_token_at is None:
                    r.first_token_at = time.perf_counter()
                r.emitted = len(r.output_ids)
                out.append(StepOutput(r.request_id, list(new), r.finish_reason, r.request_id))
                self.tokens_generated += len(new)
                if r.finished:
                    r.finish_emitted = True
                    done.append(r)
        return out

    # ------------------------------------------------------------------ after the pass
    def _update(self, it, result: StepResult) -> None:
        r = it.request
        if r.status is not Status.RUNNING:
            return
        draft = result.drafts.get(r.request_id, Draft([]))
        nc = r.num_computed
        captured = result.captured.get(r.request_id)
        if captured is not None:
            r.kv_policy.observe_queries(r, captured)
        scored = result.prompt_logits.get(r.request_id)
        if scored is not None:
            self._record_prompt_logprobs(r, *scored)
        if not it.reaches_end:   # a prefill chunk: commit it, nothing to verify
            r.num_computed = nc + it.take
            self._register_blocks(r)
            self._tell_committed(r, result, r.tokens[nc: nc + it.take], list(range(it.take)))
            self._policy_commit(r)
            return
        started = result.started
        logits = result.logits[r.request_id]     # [rows, V]: rows from result.first_row[r] of the feed
        first_row = result.first_row[r.request_id]
        fed = it.take
        tokens, parents = draft.tokens, draft.parents
        scores = logits[fed - 1 - first_row: fed - first_row + len(tokens)]
        observed = result.observe.get(r.request_id)
        if observed is not None:
            fed_tokens, rows = observed
            r.drafter.observe(r.request_id, fed_tokens, top_ids(logits[rows[0] - first_row: rows[1] - first_row],
                                                                 r.drafter.observe_topk))
        if r.constraint is not None:
            with torch.inference_mode():   # the logits are inference tensors: masked in place
                apply_bitmask_(scores, r.masks[: len(tokens) + 1])
        if r.params.greedy:
            choices = target_argmax(scores, r.params, r.history, tokens, parents)
            verdict = verify_greedy(tokens, choices) if parents is None else verify_tree_greedy(tokens, parents, choices)
        else:
            probs = target_probabilities(scores, r.params, r.history, tokens, parents)
            typical = getattr(r.drafter, "typical", None)   # lossy: the drafter asked (Medusa's option)
            if tokens and typical is not None:
                verdict = verify_typical(tokens, parents, probs, *typical, r.generator)
            elif parents is None:
                verdict = verify_sampling(tokens, probs, draft.probs, r.generator)
            else:
                verdict = verify_tree_sampling(tokens, parents, probs, draft.probs, r.generator)
        kept = 0
        jump = r.constraint is not None and r.params.jump_forward
        for i, token in enumerate(verdict.tokens):
            kept += 1
            if r.logprobs is not None:   # scored by its parent's row: the root's, or the accepted node before it
                row = 0 if i == 0 else 1 + (verdict.path[i - 1] if parents is not None else i - 1)
                r.logprobs.append(token_logprob(scores[row], token, r.params.logprobs))
            if not self._append(r, token):
                break
            if jump and i + 1 < len(verdict.tokens) and self._forces(r):
                break   # one-token decoding would jump forward here: drop the rest of the verdict
        accepted = min(kept, verdict.accepted)
        if parents is not None and accepted:
            root = nc - r.kv_shift + fed - 1   # the logical slot of the tree's root (the last pending token)
            bs, table = self.block_size, r.block_table
            moves = compaction(verdict.path)
            self.pool.move([slot_of(table, bs, root + s) for s, _ in moves], [slot_of(table, bs, root + d) for _, d in moves])
        r.num_computed = nc + fed + accepted
        path = verdict.path[:accepted] if parents is not None else list(range(accepted))
        self._tell_committed(r, result, r.tokens[nc: nc + fed] + [tokens[i] for i in path],
                             list(range(fed)) + [fed + i for i in path])
        r.target_passes += 1   # passes that gave this request tokens (its prefill counts once, however chunked)
        r.drafted += len(tokens)
        r.accepted += accepted
        if self.goodput is not None and tokens:
            self.goodput.observe_verdict(r, len(tokens), accepted, result.draft_s.get(r.request_id, 0.0))
        r.verify_s += time.perf_counter() - started
        if not r.finished:
            self._register_blocks(r)
            self._policy_commit(r)
            if r.constraint is not None:
                self._jump_forward(r)
        if r.finished:
            self._retire(r)

    @staticmethod
    def _tell_committed(r: Request, result: StepResult, tokens: list[int], feed_rows: list[int]) -> None:
        """Drafter contract v2: the tokens committed this step (and, for ``needs_hidden``, their final hidden
        states, found by feed index in the passes' hidden rows)."""
        if r.drafter is None or not tokens:
            return
        hidden = None
        if r.drafter.needs_hidden:
            parts = result.hidden.get(r.request_id, [])
            rows = torch.cat([h for _, h in parts]) if parts else None
            first = parts[0][0] if parts else 0
            hidden = rows[[f - first for f in feed_rows]] if rows is not None else None
        r.drafter.committed(r.request_id, tokens, hidden, start=r.num_computed - len(tokens))

    @staticmethod
    def _record_prompt_logprobs(r: Request, first: int, logits: torch.Tensor) -> None:
        """``logits [n, V]`` of prompt tokens ``first .. first + n - 1`` score tokens ``first + 1 ..`` (a recomputed
        prompt, after preemption, adds only what is missing)."""
        have = len(r.prompt_logprobs)
        skip = have - (first + 1)
        if skip >= logits.shape[0] or skip < 0:
            return
        rows = logits[skip:].float().log_softmax(dim=-1)
        targets = torch.tensor(r.prompt_ids[have: have + rows.shape[0]], device=rows.device)
        values = rows.gather(1, targets[:, None])[:, 0].tolist()
        k = r.params.prompt_logprobs
        if k:
            top_v, top_i = rows.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
        else:
            tops = [[] for _ in values]
        r.prompt_logprobs += [TokenLogprob(v, t) for v, t in zip(values, tops)]

    def _policy_commit(self, r: Request) -> None:
        """Let ``r``'s KV policy compress or evict after a commit."""
        if r.kv_policy is not None:
            r.kv_policy.after_commit(r, KVAccess(self.pool, self.blocks, self.model))

    def _register_blocks(self, r: Request) -> None:
        """Put ``r``'s newly full, committed blocks in the prefix cache (not once a KV policy rewrote them)."""
        if r.kv_policy is not None and (r.kv_shift or not r.kv_policy.prefix_cache):
            return
        bs = self.block_size
        for i in range(len(r.block_hashes), r.num_computed // bs):
            parent = r.block_hashes[-1] if r.block_hashes else None
            r.block_hashes.append(self.blocks.register(r.block_table[i], parent, r.tokens[i * bs: (i + 1) * bs]))

    def _retire(self, r: Request) -> None:
        if r.status is not Status.FINISHED:
            if r.keep_kv:
                bs = self.block_size
                slots = [slot_of(r.block_table, bs, j) for j in range(r.num_slots)]
                r.final_kv = [self.pool.gather(layer, slots) for layer in range(self.config.num_layers)]
            r.final_kv_blocks = len(r.block_table)
            self.scheduler.remove(r)
        r.masks = None
        if r.drafter is not None:
            r.drafter.reset(r.request_id)
        if self.goodput is not None:
            self.goodput.forget(r.request_id)

    def _finish(self, r: Request, reason: str) -> None:
        if not r.finished:
            r.finish_reason = reason
            r.finished_at = time.perf_counter()

    # ------------------------------------------------------------------ tokens, grammar
    def _append(self, r: Request, token: int) -> bool:
        """Add ``token`` to ``r``'s output (grammar, penalty history, stop rules); False once it finished."""
        r.output_ids.append(token)
        r.tokens.append(token)
        if r.history is not None:
            r.history.add([token])
        c = r.constraint
        if c is not None:
            t = time.perf_counter()
            c.advance([token])   # never fails for a masked choice: ConstraintError means a bug or a grammar limit
            complete = c.is_finished()
            r.constraint_s += time.perf_counter() - t
            if complete:   # only EOS could follow: finish as if it had been sampled
                self._finish(r, "stop")
                return False
        if token in r.stop_ids:
            self._finish(r, "stop")
        elif len(r.output_ids) >= r.max_new:
            self._finish(r, "length")
        return not r.finished

    def _jump_forward(self, r: Request) -> None:
        """Append the tokens ``r``'s grammar forces now to its output (they are fed as pending tokens)."""
        if r.finished or not r.params.jump_forward:
            return
        t = time.perf_counter()
        forced = r.constraint.forced()
        r.constraint_s += time.perf_counter() - t
        for token in forced[: max(0, r.max_new - len(r.output_ids))]:
            r.forced_tokens += 1
            if r.logprobs is not None:   # the only token the grammar allows here
                r.logprobs.append(TokenLogprob(0.0, [(token, 0.0)][: r.params.logprobs]))
            if not self._append(r, token):
                break

    @staticmethod
    def _forces(r: Request) -> bool:
        t = time.perf_counter()
        forced = bool(r.constraint.forced())
        r.constraint_s += time.perf_counter() - t
        return forced

    def constrain(self, r: Request, draft: Draft) -> Draft:
        """Prune ``r``'s draft to what its grammar accepts and fill ``r.masks`` (see ``constrain_draft``)."""
        vocab = self.config.vocab_size
        rows_needed = 1 + len(draft.tokens)
        masks = r.masks
        if masks is None or masks.shape[0] < rows_needed:
            most = 1 + (r.drafter.num_draft if r.drafter is not None else 0)
            masks = r.masks = torch.empty(max(rows_needed, most), bitmask_width(vocab), dtype=torch.int32)
        t = time.perf_counter()
        kept = constrain_draft(r.constraint, draft, masks, r.params.jump_forward, r.mask_times)
        used = masks[: 1 + len(kept.tokens)]
        if r.params.ignore_eos:
            clear_ids(used, [e for e in self.eos_token_ids if e < vocab])
        if not bool(used.any(dim=-1).all()):
            raise ConstraintError(f"the {getattr(getattr(r.constraint, 'grammar', None), 'kind', '')} constraint "
                                  f"allows no token after {len(r.output_ids)} output tokens")
        r.constraint_s += time.perf_counter() - t
        r.pruned += len(draft.tokens) - len(kept.tokens)
        return kept
