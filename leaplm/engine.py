"""The generation loop. The engine knows token ids, never text (stop strings live in ``llm.py``).

``Engine(model, eos_token_ids).start(prompts, params) -> Batch``; then ``batch.step()`` until
``batch.done``. Each step runs one target forward pass for every unfinished row and returns the
tokens each row gained (``StepOutput``). A caller may end a row early with ``batch.finish(row)``
(e.g. a stop string matched in its text).

Cache protocol (see ``cache/kv.py``): ``cache.lengths[b]`` counts the row's tokens whose keys and
values are committed. After a step, a row has one *pending* token (sampled, not yet fed); the next
step feeds it at position ``lengths[b]`` and commits it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .cache.kv import KVCache
from .errors import InvalidParamsError, PromptTooLongError
from .sampling import SamplingParams, TokenHistory, make_generator
from .spec.drafters.base import Draft, Drafter
from .spec.verify import target_argmax, target_probabilities, verify_greedy, verify_sampling


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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    row: int
    new_token_ids: list[int]
    finish_reason: str | None


class Engine:
    """Runs batches of requests on one model. ``prefill_chunk`` bounds activation memory on long prompts."""

    def __init__(self, model, eos_token_ids: Sequence[int] = (), max_model_len: int | None = None,
                 prefill_chunk: int = 1024) -> None:
        self.model = model
        self.config = model.config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk

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

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
              drafter: Drafter | None = None) -> "Batch":
        if len(prompts) != len(params):
            raise InvalidParamsError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        rows = []
        device = self.model.device
        for ids, p in zip(prompts, params):
            self.check_prompt(ids)
            stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
            rows.append(RowState(
                prompt_ids=list(ids), params=p, stop_ids=frozenset(stop),
                max_new=min(p.max_tokens, self.max_model_len - len(ids)),
                generator=None if p.greedy else make_generator(p.seed, device),
                history=TokenHistory(self.config.vocab_size, ids, device) if p.uses_penalties else None,
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
        slack = drafter.num_draft if drafter is not None else 0
        capacity = max(len(r.prompt_ids) + r.max_new for r in rows) + slack
        self.cache = KVCache.for_model(self.model.config, len(rows), capacity, self.model.dtype, self.model.device)
        self.pending: list[int | None] = [None] * len(rows)

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.rows)

    def finish(self, row: int, reason: str = "stop") -> None:
        state = self.rows[row]
        if not state.finished:
            state.finish_reason = reason
            state.finished_at = time.perf_counter()

    def run(self) -> list[RowState]:
        """Step until every row is finished; returns the rows (``output_ids``, stats)."""
        while not self.done:
            self.step()
        return self.rows

    def step(self) -> list[StepOutput]:
        if self.done:
            return []
        started = time.perf_counter()
        if self.pending[0] is None and not any(r.output_ids for r in self.rows):
            return self._accept(self._prefill()[:, None], [Draft([])] * len(self.rows), started, prefill=True)
        drafts = self._propose()
        started = time.perf_counter()
        return self._accept(self._decode(drafts), drafts, started, prefill=False)

    # ------------------------------------------------------------------ passes
    def _prefill(self) -> torch.Tensor:
        """All prompts, chunked along time; returns logits of each row's last prompt token ``[B, V]``."""
        device = self.model.device
        now = time.perf_counter()
        for r in self.rows:
            r.started = now
        lengths = [len(r.prompt_ids) for r in self.rows]
        longest = max(lengths)
        tokens = torch.zeros(len(self.rows), longest, dtype=torch.long)
        for b, r in enumerate(self.rows):
            tokens[b, : lengths[b]] = torch.tensor(r.prompt_ids)
        tokens = tokens.to(device)
        last = torch.tensor([n - 1 for n in lengths], device=device)
        out = torch.empty(len(self.rows), self.model.config.vocab_size, device=device)
        chunk = self.engine.prefill_chunk
        for start in range(0, longest, chunk):
            end = min(start + chunk, longest)
            positions = torch.arange(start, end, device=device)[None].expand(len(self.rows), -1)
            idx = (last - start).clamp(0, end - start - 1)
            logits = self.model(tokens[:, start:end], positions, self.cache, logit_index=idx[:, None],
                                 kv_len=end, contiguous_start=start)[:, 0]
            here = (last >= start) & (last < end)
            out[here] = logits[here]
        for b, n in enumerate(lengths):
            self.cache.commit(b, n)
            self.rows[b].target_passes += 1
        return out

    def _propose(self) -> list[Draft]:
        drafts = []
        for b, r in enumerate(self.rows):
            room = r.max_new - len(r.output_ids) - 1  # a verdict adds accepted + 1 tokens
            if self.drafter is None or r.finished or room < 1:
                drafts.append(Draft([]))
                continue
            t = time.perf_counter()
            draft = self.drafter.propose(b, r.prompt_ids + r.output_ids, min(self.drafter.num_draft, room))
            r.draft_s += time.perf_counter() - t
            drafts.append(draft)
        return drafts

    def _decode(self, drafts: list[Draft]) -> torch.Tensor:
        """Feed each row's pending token + its draft at the committed length; ``[B, 1 + k, V]`` logits."""
        device = self.model.device
        lengths = self.cache.lengths
        width = 1 + max(len(d.tokens) for d in drafts)
        feed = torch.zeros(len(self.rows), width, dtype=torch.long)
        for b, (p, d) in enumerate(zip(self.pending, drafts)):
            feed[b, 0] = p if p is not None else 0
            if d.tokens:
                feed[b, 1: 1 + len(d.tokens)] = torch.tensor(d.tokens)
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(width, device=device)
        same = all(n == lengths[0] for n in lengths)
        return self.model(feed.to(device), positions, self.cache, kv_len=max(lengths) + width,
                          contiguous_start=lengths[0] if same else None)

    def _accept(self, logits: torch.Tensor, drafts: list[Draft], started: float, prefill: bool) -> list[StepOutput]:
        """Verify each row's draft against ``logits [B, 1 + k, V]``, commit, apply stop rules."""
        outputs = []
        now = time.perf_counter()
        for b, r in enumerate(self.rows):
            if r.finished:
                continue
            draft = drafts[b].tokens
            scores = logits[b, : len(draft) + 1]
            if r.params.greedy:
                verdict = verify_greedy(draft, target_argmax(scores, r.params, r.history, draft))
            else:
                probs = target_probabilities(scores, r.params, r.history, draft)
                verdict = verify_sampling(draft, probs, drafts[b].probs, r.generator)
            if not prefill:
                self.cache.commit(b, self.cache.lengths[b] + 1 + verdict.accepted)
                r.target_passes += 1
            r.drafted += len(draft)
            r.accepted += verdict.accepted
            if r.first_token_at is None:
                r.first_token_at = now
            new = []
            for token in verdict.tokens:
                new.append(token)
                r.output_ids.append(token)
                if r.history is not None:
                    r.history.add([token])
                if token in r.stop_ids:
                    self.finish(b, "stop")
                    break
                if len(r.output_ids) >= r.max_new:
                    self.finish(b, "length")
                    break
            self.pending[b] = new[-1]
            r.verify_s += time.perf_counter() - started
            outputs.append(StepOutput(b, new, r.finish_reason))
        return outputs
