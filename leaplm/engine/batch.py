"""``Batch``: a fixed group of requests on an ``LLMEngine``, stepped until all are done (the pre-serving API, kept
for callers that generate a known set of prompts: ``engine.start(prompts, params, drafter).run()``).

``batch.rows[b]`` is the ``Request`` of prompt ``b``; ``batch.step()`` runs one engine step and returns the outputs
of this batch's rows (``StepOutput.row`` = ``b``); ``finish`` / ``truncate`` end a row early.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .kv_pool import slot_of
from .request import Request

if TYPE_CHECKING:
    from .core import LLMEngine, StepOutput


class Batch:
    def __init__(self, engine: "LLMEngine", request_ids: list[int], drafter=None) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.rows: list[Request] = [engine.requests[i] for i in request_ids]
        self._row_of = {rid: b for b, rid in enumerate(request_ids)}
        self.drafter = drafter

    @property
    def done(self) -> bool:
        return all(r.finish_emitted for r in self.rows)

    def step(self) -> list["StepOutput"]:
        if self.done:
            return []
        outputs = []
        for out in self.engine.step():
            b = self._row_of.get(out.request_id)
            if b is not None:
                out.row = b
                outputs.append(out)
                if out.finish_reason is not None:   # the batch keeps the Request; the engine forgets it
                    self.engine.release(out.request_id)
        return outputs

    def run(self) -> list[Request]:
        """Step until every row is finished; returns the rows (``output_ids``, stats)."""
        while not self.done:
            self.step()
        return self.rows

    def finish(self, row: int, reason: str = "stop") -> None:
        self.truncate(row, None, reason)

    def truncate(self, row: int, n: int | None, reason: str = "stop") -> None:
        """Keep the first ``n`` output tokens of ``row`` (None: all) and finish it with ``reason`` (a stop string
        found in its text after token ``n``: a speculative step may have accepted tokens past it)."""
        rid = self.request_ids[row]
        if rid in self.engine.requests:
            self.engine.finish_request(rid, n, reason)
            return
        r = self.rows[row]   # already finished and released: only its record changes
        if n is not None:
            if not 0 <= n <= len(r.output_ids):
                raise ValueError(f"cannot keep {n} of row {row}'s {len(r.output_ids)} output tokens")
            del r.output_ids[n:]
            del r.tokens[len(r.prompt_ids) + n:]
        r.finish_reason = reason

    def committed_kv(self, row: int, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values of ``row``'s committed slots ``[1, kv_heads, length, D]``: read from the pool while it runs,
        the copy it kept when it finished (``start(..., keep_kv=True)``) after."""
        r = self.rows[row]
        if r.finished:
            if r.final_kv is None:
                raise ValueError(f"row {row} finished and kept no keys and values: start the batch with keep_kv=True")
            return r.final_kv[layer]
        bs = self.engine.block_size
        return self.engine.pool.gather(layer, [slot_of(r.block_table, bs, j) for j in range(r.num_slots)])

    def kv_snapshot(self) -> "KVSnapshot":
        """A copy of every row's committed keys and values now (``KVSnapshot``)."""
        layers = self.engine.config.num_layers
        rows = [[self.committed_kv(b, layer) for layer in range(layers)] for b in range(len(self.rows))]
        return KVSnapshot(rows)


class KVSnapshot:
    """Rows' committed keys and values, laid out as the old batch cache: ``lengths[b]``; ``k[layer]``, ``v[layer]``
    ``[B, kv_heads, max length, D]`` (zero past a row's length); ``view(layer, n)`` their first ``n`` slots."""

    def __init__(self, rows: list[list[tuple[Tensor, Tensor]]]) -> None:
        self.lengths = [kv[0][0].shape[2] for kv in rows]
        longest = max(self.lengths, default=0)
        self.k, self.v = [], []
        for layer in range(len(rows[0]) if rows else 0):
            k0 = rows[0][layer][0]
            k = k0.new_zeros(len(rows), k0.shape[1], longest, k0.shape[3])
            v = k.clone()
            for b, kv in enumerate(rows):
                n = self.lengths[b]
                k[b, :, :n], v[b, :, :n] = kv[layer][0][0], kv[layer][1][0]
            self.k.append(k)
            self.v.append(v)

    def view(self, layer: int, upto: int) -> tuple[Tensor, Tensor]:
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]
