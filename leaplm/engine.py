"""The generation loop. The engine knows token ids, never text (stop strings live in ``llm.py``).

``Engine(model, eos_token_ids).start(prompts, params) -> Batch``; then ``batch.step()`` until
``batch.done``. Each step runs one target forward pass for every unfinished row and returns the
tokens each row gained (``StepOutput``). A caller may end a row early with ``batch.finish(row)``
(e.g. a stop string matched in its text).

Cache protocol (see ``cache/kv.py``): ``cache.lengths[b]`` counts the row's tokens whose keys and
values are committed. After a step, a row has *pending* tokens: output tokens not yet fed (normally
one, the token just sampled; jump-forward adds the tokens a grammar forces). The next step feeds them
from position ``lengths[b]``, then the draft, and commits them; the target's verification reads the
logits from the last pending token on.

Drafts are chains or token trees (``speculative/tree.py``). A step in which some row drafted a tree feeds
every row as a tree (chains are trees too) with tree attention; the accepted path is compacted
into the committed slots.

Structured output (``SamplingParams.json_schema`` / ``regex`` / ``grammar`` / ``json_object``): such a
row carries a ``Constraint`` (``leaplm.constrain``): the grammar's cursor, always positioned after the
row's output tokens. The engine has no tokenizer, so it does not compile grammars: ``Engine(...,
constrainer=fn)`` takes ``fn(params) -> Constraint`` (a fresh cursor; ``LLM`` passes one that compiles
with its tokenizer, cached), and ``start(..., constraints=[...])`` takes ready cursors per row (None:
from the constrainer when the row's params ask for one). Compile errors (``InvalidConstraintError``)
come from ``start``, before any model pass. In every step of a constrained row:

1. jump-forward (``params.jump_forward``): the tokens the grammar forces from the row's state are
   appended to its output without sampling, at most ``JUMP_MAX`` per step (all of them before the
   prefill, which feeds them with the prompt), and fed as pending tokens;
2. the draft is pruned to what the grammar accepts (``constrain_draft``: a chain is cut at its first
   rejected token; a tree loses every node whose root-to-node path is rejected) and a mask is computed
   for every verified feed position: the tokens allowed after the root, and after each node's path;
3. the masks set the disallowed *raw* logits to -inf before penalties and warpers, so greedy choice and
   speculative sampling only ever pick allowed tokens, and EOS only where the grammar may end;
4. the verdict's tokens are consumed one by one. The row finishes ``"stop"`` at EOS or a stop token, or
   when the grammar is complete and cannot go on; ``"length"`` at ``max_tokens``. With jump-forward
   the verdict is cut after the first token after which the grammar forces tokens (they come in step
   1 of the next step): exactly where one-token-a-step decoding jumps, so greedy output with speculation
   equals greedy output without it, token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .cache.kv import KVCache
from .constrain.base import Constraint, apply_bitmask_, bitmask_width
from .errors import ConstraintError, InvalidParamsError, PromptTooLongError
from .sampling import SamplingParams, TokenHistory, make_generator, top_ids
from .speculative.drafters.base import Draft, Drafter
from .models.transformer import EXACT_MAX_T
from .speculative.tree import ancestor_matrix, chain_parents, check_tree, compaction, depths, path_to
from .speculative.verify import (target_argmax, target_probabilities, verify_greedy, verify_sampling,
                          verify_tree_greedy, verify_tree_sampling)

JUMP_MAX = 32   # jump-forward tokens appended per row and step (the KV cache keeps this much slack)


@dataclass
class RowState:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_new: int                      # max_tokens, clipped to the room left in the context window
    generator: torch.Generator | None
    history: TokenHistory | None
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    started: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    target_passes: int = 0
    drafted: int = 0                  # draft tokens proposed to the target
    accepted: int = 0                 # draft tokens the target accepted
    draft_s: float = 0.0              # time spent drafting
    verify_s: float = 0.0             # time spent in target passes + verification
    constraint: Constraint | None = None   # structured output: the grammar's cursor after output_ids
    forced_tokens: int = 0            # tokens appended by jump-forward (forced by the grammar, never sampled)
    pruned: int = 0                   # draft tokens dropped before verification because the grammar rejects them
    constraint_s: float = 0.0         # time in the constraint: masks, pruning drafts, advancing, jump-forward
    mask_times: list[float] = field(default_factory=list)   # seconds per next-token mask computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    row: int
    new_token_ids: list[int]
    finish_reason: str | None


class Engine:
    """Runs batches of requests on one model. ``prefill_chunk`` bounds activation memory on long prompts.

    ``constrainer(params) -> Constraint``: builds a fresh grammar cursor for a request whose params ask
    for structured output (compiling, or taking it from a cache, with the model's tokenizer; raises
    ``InvalidConstraintError``). Its ``vocab_size`` must be the model's logits width. None: such requests
    raise ``InvalidParamsError`` unless ``start`` is given their constraints.
    """

    def __init__(self, model, eos_token_ids: Sequence[int] = (), max_model_len: int | None = None,
                 prefill_chunk: int = 1024,
                 constrainer: Callable[[SamplingParams], Constraint] | None = None) -> None:
        self.model = model
        self.config = model.config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.constrainer = constrainer

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise InvalidParamsError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the context window is {self.max_model_len} "
                f"tokens (prompt + at least one generated token must fit); shorten the prompt"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidParamsError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")

    def constraint_for(self, params: SamplingParams, given: Constraint | None = None) -> Constraint | None:
        """The row's grammar cursor: ``given``, else one from the constrainer when ``params`` ask for one."""
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

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
              drafter: Drafter | None = None,
              constraints: Sequence[Constraint | None] | None = None) -> "Batch":
        """A batch of requests, ready to ``step()``. ``constraints``: one grammar cursor (or None) per row,
        each at the grammar's start (``compiled.new()``); rows left None get one from the constrainer when
        their params ask for structured output. Every prompt is checked and every grammar compiled here."""
        if len(prompts) != len(params):
            raise InvalidParamsError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        if constraints is not None and len(constraints) != len(prompts):
            raise InvalidParamsError(f"{len(prompts)} prompts but {len(constraints)} constraints")
        for ids in prompts:
            self.check_prompt(ids)
        cursors = [self.constraint_for(p, constraints[i] if constraints is not None else None)
                   for i, p in enumerate(params)]
        rows = []
        device = self.model.device
        for ids, p, c in zip(prompts, params, cursors):
            stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
            rows.append(RowState(
                prompt_ids=list(ids), params=p, stop_ids=frozenset(stop),
                max_new=min(p.max_tokens, self.max_model_len - len(ids)),
                generator=None if p.greedy else make_generator(p.seed, device),
                history=TokenHistory(self.config.vocab_size, ids, device) if p.uses_penalties else None,
                constraint=c,
            ))
        return Batch(self, rows, drafter)


class Batch:
    """One batch of requests in flight. Every decode step is draft -> one target pass -> verify ->
    commit; without a drafter the draft is empty and this is plain decoding (one token per step)."""

    def __init__(self, engine: Engine, rows: list[RowState], drafter: Drafter | None = None) -> None:
        self.engine = engine
        self.model = engine.model
        self.rows = rows
        self.drafter = drafter
        for b in range(len(rows)):
            if drafter is not None:
                drafter.start(b, rows[b].params)
        # slack for draft tokens written past a finished row's length while other rows speculate
        # (and jump-forward tokens, which widen a pass like draft tokens do)
        slack = drafter.num_draft if drafter is not None else 0
        if any(r.constraint is not None and r.params.jump_forward for r in rows):
            slack += JUMP_MAX + 1
        capacity = max(len(r.prompt_ids) + r.max_new for r in rows) + slack
        self.cache = KVCache.for_model(self.model.config, len(rows), capacity, self.model.dtype, self.model.device)
        self.pending: list[list[int]] = [[] for _ in rows]   # output tokens not fed yet, per row
        self.prefilled = False
        self._jumped: list[list[int]] = [[] for _ in rows]   # this step's jump-forward tokens, per row
        self._feed_only = [False] * len(rows)                # more forced tokens than JUMP_MAX: verify nothing
        self._masks: list[Tensor | None] = [None] * len(rows)  # int32 [>= 1 + n, W]: this step's masks

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.rows)

    def finish(self, row: int, reason: str = "stop") -> None:
        state = self.rows[row]
        if not state.finished:
            state.finish_reason = reason
            state.finished_at = time.perf_counter()

    def truncate(self, row: int, n: int, reason: str = "stop") -> None:
        """Keep the first ``n`` output tokens of ``row`` and finish it with ``reason`` (a stop string found
        in its text after token ``n``: a speculative step may have accepted tokens past it). The row's
        cache, pending tokens and drafter state no longer matter once it is finished."""
        state = self.rows[row]
        if not 0 <= n <= len(state.output_ids):
            raise ValueError(f"cannot keep {n} of row {row}'s {len(state.output_ids)} output tokens")
        del state.output_ids[n:]
        self.finish(row)
        state.finish_reason = reason

    def run(self) -> list[RowState]:
        """Step until every row is finished; returns the rows (``output_ids``, stats)."""
        while not self.done:
            self.step()
        return self.rows

    def step(self) -> list[StepOutput]:
        if self.done:
            return []
        started = time.perf_counter()
        if not self.prefilled:
            for r in self.rows:
                r.started = started
            for b, r in enumerate(self.rows):   # the grammar's forced start goes into the prefill
                if r.constraint is not None:
                    self._jump_forward(b, limit=r.max_new)
                    if not r.finished:
                        self._constrain(b, Draft([]))
            if self.done:
                return self._jumped_outputs()
            self.prefilled = True
            return self._accept(self._prefill()[:, None], [Draft([])] * len(self.rows), started, prefill=True)
        drafts = self._propose()
        if self.done:   # jump-forward finished every row: no pass needed
            return self._jumped_outputs()
        started = time.perf_counter()
        return self._accept(self._decode(drafts), drafts, started, prefill=False)

    # ------------------------------------------------------------------ passes
    def _prefill(self) -> torch.Tensor:
        """Each row's prompt (+ jump-forward tokens) in its own pass, chunked along time; logits of each
        row's last fed token ``[B, V]``.

        Rows are prefilled one at a time, never padded to the longest: a row's prefill is then the very
        pass it gets when run alone (same shapes, same chunks), so batching cannot change its keys,
        values or first token. (A padded ``[B, longest]`` pass attends over another kernel tiling and
        changed greedy output on the real int8 SmolLM2.)"""
        device = self.model.device
        out = torch.empty(len(self.rows), self.model.config.vocab_size, device=device)
        chunk = self.engine.prefill_chunk
        for b, r in enumerate(self.rows):
            seq = r.prompt_ids + self.pending[b]
            tokens = torch.tensor([seq], dtype=torch.long, device=device)
            cache = self.cache.row(b)
            for start in range(0, len(seq), chunk):
                end = min(start + chunk, len(seq))
                positions = torch.arange(start, end, device=device)[None]
                logits = self.model(tokens[:, start:end], positions, cache, logit_index=positions[:, -1:] - start,
                                    kv_len=end, contiguous_start=start)
            out[b] = logits[0, 0]
            self.cache.commit(b, len(seq))
            r.target_passes += 1
        return out

    def _propose(self) -> list[Draft]:
        drafts = []
        for b, r in enumerate(self.rows):
            self._jumped[b] = []
            if r.constraint is not None:
                self._jump_forward(b, limit=JUMP_MAX)
            room = r.max_new - len(r.output_ids) - 1  # a verdict adds accepted + 1 tokens
            if self.drafter is None or r.finished or room < 1 or self._feed_only[b]:
                draft = Draft([])
            else:
                t = time.perf_counter()
                budget = min(self.drafter.num_draft, room)
                if getattr(self.model, "exact", False):   # wider passes fall back to batched attention
                    budget = min(budget, EXACT_MAX_T - len(self.pending[b]))
                draft = (self.drafter.propose(b, r.prompt_ids + r.output_ids, budget) if budget > 0
                         else Draft([]))
                r.draft_s += time.perf_counter() - t
                if draft.is_tree:
                    check_tree(draft.tokens, draft.parents)
                    if max(depths(draft.parents), default=0) > room:
                        raise ValueError(f"{self.drafter.name} drafted a tree deeper than the {room} tokens left")
                    if draft.parents == chain_parents(len(draft.parents)):   # a chain after all:
                        draft = Draft(draft.tokens, draft.probs)   # the chain pass is cheaper (no tree mask)
            if r.constraint is not None and not r.finished and not self._feed_only[b]:
                draft = self._constrain(b, draft)
            drafts.append(draft)
        return drafts

    def _decode(self, drafts: list[Draft]) -> torch.Tensor:
        """Feed each row's pending tokens + its draft at the committed length; ``[B, T, V]`` logits, T = the
        widest feed (row b's feed index f sits at slot ``lengths[b] + f``)."""
        device = self.model.device
        lengths = self.cache.lengths
        seqs = [[] if r.finished else self.pending[b] + d.tokens for b, (r, d) in enumerate(zip(self.rows, drafts))]
        width = max(1, max(len(x) for x in seqs))
        feed = torch.zeros(len(self.rows), width, dtype=torch.long)
        for b, x in enumerate(seqs):
            if x:
                feed[b, : len(x)] = torch.tensor(x)
        if any(d.is_tree for d in drafts):
            prefix = [1 if r.finished else len(self.pending[b]) for b, r in enumerate(self.rows)]
            return self._decode_tree(feed.to(device), drafts, prefix)
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(width, device=device)
        same = all(n == lengths[0] for n in lengths)
        return self.model(feed.to(device), positions, self.cache, kv_len=max(lengths) + width,
                          contiguous_start=lengths[0] if same else None)

    def _decode_tree(self, feed: torch.Tensor, drafts: list[Draft], prefix: list[int]) -> torch.Tensor:
        """Tree attention pass: node positions follow depth, slots follow feed order. Row b's ``prefix[b]``
        pending tokens form a chain from the root; its draft hangs off the last of them."""
        B, width = feed.shape
        lengths = list(self.cache.lengths)
        positions = torch.tensor(lengths)[:, None].repeat(1, width)
        mask = torch.zeros(B, width, width, dtype=torch.bool)
        for b, d in enumerate(drafts):
            parents = feed_parents(prefix[b], d)
            positions[b, 1: 1 + len(parents)] += torch.tensor(depths(parents), dtype=torch.long)
            mask[b] = ancestor_matrix(parents, width)
        device = self.model.device
        return self.model(feed, positions.to(device), self.cache, kv_len=max(lengths) + width,
                          tree=(lengths, mask.to(device)))

    # ------------------------------------------------------------------ structured output
    def _append(self, b: int, token: int) -> bool:
        """Add ``token`` to row b's output (grammar, penalty history, stop rules); False once the row finished."""
        r = self.rows[b]
        r.output_ids.append(token)
        if r.history is not None:
            r.history.add([token])
        c = r.constraint
        if c is not None:
            t = time.perf_counter()
            c.advance([token])   # never fails for a masked choice: ConstraintError means a bug or a grammar limit
            complete = c.is_finished()
            r.constraint_s += time.perf_counter() - t
            if complete:   # only EOS could follow: finish as if it had been sampled
                self.finish(b, "stop")
                return False
        if token in r.stop_ids:
            self.finish(b, "stop")
        elif len(r.output_ids) >= r.max_new:
            self.finish(b, "length")
        return not r.finished

    def _jump_forward(self, b: int, limit: int) -> None:
        """Append the tokens row b's grammar forces now (at most ``limit``) to its output and pending feed."""
        r = self.rows[b]
        self._feed_only[b] = False
        if r.finished or not r.params.jump_forward:
            return
        t = time.perf_counter()
        forced = r.constraint.forced()
        r.constraint_s += time.perf_counter() - t
        take = forced[: max(0, min(limit, r.max_new - len(r.output_ids)))]
        for token in take:
            self.pending[b].append(token)
            self._jumped[b].append(token)
            r.forced_tokens += 1
            if not self._append(b, token):
                break
        # the grammar forces more than a pass may carry: feed these, verify nothing, jump again next step
        self._feed_only[b] = not r.finished and len(forced) > len(take)

    def _constrain(self, b: int, draft: Draft) -> Draft:
        """Prune row b's draft to what its grammar accepts and fill ``self._masks[b]`` (see ``constrain_draft``)."""
        r = self.rows[b]
        vocab = self.model.config.vocab_size
        rows_needed = 1 + len(draft.tokens)
        masks = self._masks[b]
        if masks is None or masks.shape[0] < rows_needed:
            most = 1 + (self.drafter.num_draft if self.drafter is not None else 0)
            masks = self._masks[b] = torch.empty(max(rows_needed, most), bitmask_width(vocab), dtype=torch.int32)
        t = time.perf_counter()
        kept = constrain_draft(r.constraint, draft, masks, r.params.jump_forward, r.mask_times)
        used = masks[: 1 + len(kept.tokens)]
        if r.params.ignore_eos:
            _clear_ids(used, [e for e in self.engine.eos_token_ids if e < vocab])
        if not bool(used.any(dim=-1).all()):
            raise ConstraintError(f"the {getattr(getattr(r.constraint, 'grammar', None), 'kind', '')} constraint "
                                  f"allows no token after {len(r.output_ids)} output tokens")
        r.constraint_s += time.perf_counter() - t
        r.pruned += len(draft.tokens) - len(kept.tokens)
        return kept

    def _jumped_outputs(self) -> list[StepOutput]:
        """Step outputs when jump-forward alone finished every row (no model pass)."""
        now = time.perf_counter()
        outputs = []
        for b, r in enumerate(self.rows):
            if self._jumped[b]:
                if r.first_token_at is None:
                    r.first_token_at = now
                outputs.append(StepOutput(b, list(self._jumped[b]), r.finish_reason))
        return outputs

    # ------------------------------------------------------------------ verification
    def _accept(self, logits: torch.Tensor, drafts: list[Draft], started: float, prefill: bool) -> list[StepOutput]:
        """Verify each row's draft against ``logits [B, T, V]`` (row b's verified positions start at its last
        pending token: feed index ``len(pending[b]) - 1``; after a prefill, ``T = 1``), commit, apply stop rules."""
        outputs = []
        now = time.perf_counter()
        for b, r in enumerate(self.rows):
            jumped = self._jumped[b]
            if r.finished:   # finished by this step's jump-forward (or earlier: nothing new)
                if jumped:
                    r.first_token_at = r.first_token_at or now
                    outputs.append(StepOutput(b, list(jumped), r.finish_reason))
                continue
            draft = drafts[b].tokens
            parents = drafts[b].parents
            fed = 1 if prefill else len(self.pending[b])
            scores = logits[b, fed - 1: fed + len(draft)]
            if self.drafter is not None and self.drafter.observe_topk:
                tokens = [(r.prompt_ids + self.pending[b])[-1]] if prefill else self.pending[b] + list(draft)
                # the raw logits: the model's own candidates, not the grammar's
                self.drafter.observe(b, tokens, top_ids(logits[b, : len(tokens)], self.drafter.observe_topk))
            verdict = None
            if not self._feed_only[b]:
                if r.constraint is not None:
                    with torch.inference_mode():   # the logits are inference tensors: masked in place
                        apply_bitmask_(scores, self._masks[b][: len(draft) + 1])
                if r.params.greedy:
                    choices = target_argmax(scores, r.params, r.history, draft, parents)
                    verdict = (verify_greedy(draft, choices) if parents is None
                               else verify_tree_greedy(draft, parents, choices))
                else:
                    probs = target_probabilities(scores, r.params, r.history, draft, parents)
                    verdict = (verify_sampling(draft, probs, drafts[b].probs, r.generator) if parents is None
                               else verify_tree_sampling(draft, parents, probs, drafts[b].probs, r.generator))
            new = list(jumped)
            kept = 0
            if verdict is not None:
                jump = r.constraint is not None and r.params.jump_forward
                for i, token in enumerate(verdict.tokens):
                    new.append(token)
                    kept += 1
                    if not self._append(b, token):
                        break
                    if jump and i + 1 < len(verdict.tokens) and self._forces(r):
                        break   # one-token decoding would jump forward here: drop the rest of the verdict
            accepted = min(kept, verdict.accepted) if verdict is not None else 0
            if not prefill:
                length = self.cache.lengths[b]
                if parents is not None and accepted:
                    base = length + fed - 1   # the slot of the tree's root (the last pending token)
                    self.cache.move(b, [(base + src, base + dst) for src, dst in compaction(verdict.path)])
                self.cache.commit(b, length + fed + accepted)
                r.target_passes += 1
            # the verdict's last token is new (not fed) unless the verdict was cut at an accepted draft token
            self.pending[b] = [verdict.tokens[-1]] if verdict is not None and kept == len(verdict.tokens) else []
            r.drafted += len(draft)
            r.accepted += accepted
            if r.first_token_at is None:
                r.first_token_at = now
            r.verify_s += time.perf_counter() - started
            outputs.append(StepOutput(b, new, r.finish_reason))
        return outputs

    @staticmethod
    def _forces(r: RowState) -> bool:
        t = time.perf_counter()
        forced = bool(r.constraint.forced())
        r.constraint_s += time.perf_counter() - t
        return forced


def feed_parents(prefix: int, draft: Draft) -> list[int]:
    """Tree parents of feed indices ``1..`` for a row that feeds ``prefix`` (>= 1) pending tokens, a chain
    from the root (feed 0), and then ``draft``'s nodes hanging off the last pending token."""
    base = prefix - 1
    own = draft.parents if draft.is_tree else chain_parents(len(draft.tokens))
    return list(range(-1, base - 1)) + [base - 1 if p < 0 else base + p for p in own]


def constrain_draft(constraint: Constraint, draft: Draft, masks: Tensor, jump_forward: bool = True,
                    mask_times: list[float] | None = None) -> Draft:
    """Prune ``draft`` to what the grammar accepts and write the masks its verification needs.

    ``constraint`` is at the *root* state (after every output token); it is unchanged on return.
    ``masks``: int32 CPU ``[>= 1 + n, W]`` (``W = bitmask_width(V)``). On return row 0 is the mask at the
    root and row ``1 + j`` the mask after the root-to-node path of node ``j`` of the returned draft, so
    ``masks[: 1 + len(result.tokens)]`` lines up with the target's verification logits ``[1 + n', V]``.

    A node is dropped, with its subtree, when the grammar rejects its token after its parent's path, or
    when its parent is *terminal*: the grammar is complete there (only EOS could follow), or - with
    ``jump_forward`` - it forces tokens there (decoding jumps forward at that point, so nothing drafted
    below it can be used). A terminal node's own mask row is all-allowed: its verdict token is never used.
    With draft probabilities (``draft.probs [n, V]``) a dropped node also drops its later siblings:
    recursive rejection sampling must try siblings in the order they were drawn, a prefix of it is fine.
    A chain stays a chain, cut at its first rejected token. ``mask_times`` gets the seconds each mask took.
    """
    tokens = [int(t) for t in draft.tokens]
    n = len(tokens)
    parents = draft.parents if draft.is_tree else chain_parents(n)
    vocab = constraint.vocab_size
    index = [-1] * n            # node -> its index in the pruned draft (-1: dropped)
    terminal = [False] * n
    closed: set[int] = set()    # parents (-1: the root) whose remaining children are dropped (draft probs)
    kept_tokens: list[int] = []
    kept_parents: list[int] = []
    kept_nodes: list[int] = []
    path: list[int] = []        # nodes consumed beyond the root, root's child first

    def fill(row: Tensor) -> None:
        t = time.perf_counter()
        constraint.fill_mask(row)
        if mask_times is not None:
            mask_times.append(time.perf_counter() - t)

    fill(masks[0])
    try:
        for i, (token, parent) in enumerate(zip(tokens, parents)):
            if parent in closed or (parent >= 0 and (index[parent] < 0 or terminal[parent])):
                continue
            row = masks[0] if parent < 0 else masks[1 + index[parent]]
            if not (0 <= token < vocab and (int(row[token >> 5]) >> (token & 31)) & 1):
                if draft.probs is not None:
                    closed.add(parent)
                continue
            target = path_to(parents, parent) if parent >= 0 else []
            common = 0
            while common < min(len(path), len(target)) and path[common] == target[common]:
                common += 1
            if len(path) > common:
                constraint.rollback(len(path) - common)
                path = path[:common]
            if len(target) > common:
                constraint.advance([tokens[j] for j in target[common:]])
                path = target
            constraint.advance([token])
            path = target + [i]
            index[i] = len(kept_tokens)
            kept_tokens.append(token)
            kept_parents.append(-1 if parent < 0 else index[parent])
            kept_nodes.append(i)
            terminal[i] = constraint.is_finished() or (jump_forward and bool(constraint.forced()))
            if terminal[i]:
                masks[1 + index[i]].fill_(-1)
            else:
                fill(masks[1 + index[i]])
    finally:
        if path:
            constraint.rollback(len(path))
    if len(kept_tokens) == n:
        return draft
    if not kept_tokens:
        return Draft([])
    probs = draft.probs[kept_nodes] if draft.probs is not None else None
    return Draft(kept_tokens, probs, kept_parents if draft.is_tree else None)


def _clear_ids(bitmask: Tensor, ids: Sequence[int]) -> None:
    """Disallow ``ids`` in every row of ``bitmask [N, W]`` that allows some other token (``ignore_eos``)."""
    if not ids:
        return
    before = bitmask.clone()
    for i in ids:
        bit = -(1 << 31) if i & 31 == 31 else 1 << (i & 31)
        bitmask[:, i >> 5] &= ~bit
    empty = ~bitmask.any(dim=-1)
    if bool(empty.any()):
        bitmask[empty] = before[empty]
