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

import sys


class Progress:
    """A rich progress bar with ETA on stderr when it is a terminal; else a log line every ~10 % of ``total``.
    A no-op when ``enabled`` is false. Use as a context manager: ``with Progress(n, "ppl", on) as p: p.advance()``."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.done = 0
        self.bar = None
        self._next_log = 0

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn(f"[bold]{self.label}[/] {{task.description}}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                    TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task("", total=self.total)
            self.bar.start()
        return self

    def advance(self, description: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=description)
        elif self.enabled and (self.done >= self._next_log or self.done == self.total):
            print(f"[{self.label}] {self.done}/{self.total} {description}".rstrip(), file=sys.stderr, flush=True)
            self._next_log = self.done + max(1, self.total // 10)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
