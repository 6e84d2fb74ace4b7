"""``leaplm bench``: the benchmark harness (Spec-Bench protocol, leaplm methods vs peer engines).

Modules, each with its contract in its docstring:

* ``workloads`` - prompt sets -> ``Sample`` lists (spec_bench, humaneval, builtin, any JSONL file).
* ``methods``   - the registry of leaplm decoding methods (``vanilla`` first; others plug in by name).
* ``peers``     - other engines on the same weights and token ids (transformers ``hf``, ``llamacpp``).
* ``runner``    - the protocol (threads, warm-up, interleaved runs) and the metrics -> results dict.
* ``report``    - results -> ``report.md``, PNG plots, the terminal table.
* ``cli``       - ``add_parser(subparsers)`` / ``main(args)`` for ``leaplm bench``.
"""
from __future__ import annotations

from ..errors import LeapLMError


class BenchError(LeapLMError):
    """A benchmark that cannot run as asked (unknown method, missing workload file, ...)."""
