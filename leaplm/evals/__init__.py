"""Quality evaluations, so a lossy mode (quantized weights) reports its quality cost beside its speed.

Modules, each with its contract in its docstring:

* ``perplexity`` - teacher-forced perplexity (and bits per byte) of leaplm's ``Transformer`` on texts, with
  next-token top-1 agreement and KL divergence against a reference model (e.g. int8 vs float32 weights).
* ``humaneval``  - HumanEval pass@1 with greedy decoding through ``LLM``; every program runs in its own
  subprocess with a time limit, resource limits and no network (a guard, not a security boundary).
* ``cli``        - ``add_parser(subparsers)`` for ``leaplm eval perplexity|humaneval``.

Errors a user can cause (missing file, empty text, ``limit < 1``) raise ``InvalidParamsError``.
"""
from __future__ import annotations

from ..progress import Progress

__all__ = ["Progress"]
