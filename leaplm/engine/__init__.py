"""The generation engine (``LLMEngine``): continuous batching over a paged KV pool with prefix caching, and
speculation per request.

- ``core.py``: ``LLMEngine`` (``add_request`` / ``abort`` / ``step`` / ``has_unfinished``), verification and commit;
- ``request.py``: ``Request``, all of one request's state;
- ``scheduler.py``: which requests feed what in a step (token budget, chunked prefill, admission, preemption);
- ``kv_pool.py``: the paged pool, block tables, prefix cache;
- ``runner.py``: drafting and the step's flat pass over the pool (``models/paged.py``);
- ``structured.py``: grammar-pruned drafts and masks;
- ``batch.py``: ``Batch``, a fixed group of requests stepped to completion (``engine.start(...)``).
"""
from __future__ import annotations

from .batch import Batch
from .core import LLMEngine, StepOutput
from .request import Request, TokenLogprob
from .structured import constrain_draft, feed_parents


class Engine(LLMEngine):
    """``LLMEngine`` for fixed groups of requests (``start(prompts, params, drafter).run()``: tests, per-method
    benchmarks): every drafter drafts its own length (``goodput=False`` by default), so a drafter's behaviour does
    not depend on measured timings."""

    def __init__(self, *args, goodput: bool = False, **kwargs) -> None:
        super().__init__(*args, goodput=goodput, **kwargs)

__all__ = ["Batch", "Engine", "LLMEngine", "Request", "StepOutput", "TokenLogprob", "constrain_draft", "feed_parents"]
