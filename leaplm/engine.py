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
from .sampling import SamplingParams, TokenHistory, make_generator, sample


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

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> "Batch":
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
        return Batch(self, rows)


class Batch:
    def __init__(self, engine: Engine, rows: list[RowState]) -> None:
        self.engine = engine
        self.model = engine.model
        self.rows = rows
        capacity = max(len(r.prompt_ids) + r.max_new for r in rows)
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

    def step(self) -> list[StepOutput]:
        if self.done:
            return []
        if self.pending[0] is None and not any(r.output_ids for r in self.rows):
            logits = self._prefill()
        else:
            logits = self._decode()
        return self._accept(logits)

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

    def _decode(self) -> torch.Tensor:
        """Feed each row's pending token at its committed length; ``[B, V]`` logits."""
        device = self.model.device
        lengths = self.cache.lengths
        feed = [p if p is not None else 0 for p in self.pending]
        tokens = torch.tensor(feed, device=device)[:, None]
        positions = torch.tensor(lengths, device=device)[:, None]
        same = all(n == lengths[0] for n in lengths)
        logits = self.model(tokens, positions, self.cache, kv_len=max(lengths) + 1,
                            contiguous_start=lengths[0] if same else None)[:, 0]
        for b, r in enumerate(self.rows):
            if not r.finished:
                self.cache.commit(b, lengths[b] + 1)
                r.target_passes += 1
        return logits

    def _accept(self, logits: torch.Tensor) -> list[StepOutput]:
        outputs = []
        now = time.perf_counter()
        for b, r in enumerate(self.rows):
            if r.finished:
                continue
            token = int(sample(logits[b: b + 1], r.params, r.history, r.generator)[0])
            r.output_ids.append(token)
            if r.history is not None:
                r.history.add([token])
            if r.first_token_at is None:
                r.first_token_at = now
            self.pending[b] = token
            if token in r.stop_ids:
                self.finish(b, "stop")
            elif len(r.output_ids) >= r.max_new:
                self.finish(b, "length")
            outputs.append(StepOutput(b, [token], r.finish_reason))
        return outputs
