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
from .request import Request
from .structured import constrain_draft, feed_parents


Engine = LLMEngine   # the pre-serving name

__all__ = ["Batch", "Engine", "LLMEngine", "Request", "StepOutput", "constrain_draft", "feed_parents"]
