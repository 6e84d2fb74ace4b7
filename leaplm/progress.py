"""One progress display for long runs (``leaplm bench``, ``leaplm eval``).

``Progress(total, label, enabled, log_every)``: a rich bar with ETA on stderr when stderr is a terminal;
otherwise a log line ``[label] done/total text`` every ``log_every`` steps (default: about every 10 % of
``total``) and at the last step. A no-op when ``enabled`` is false or ``total`` is 0.
Use as a context manager (or ``start()`` / ``stop()``)::

    with Progress(n, "perplexity", enabled) as bar:
        for item in items:
            bar.describe(item.name)        # the bar's live text (bar only)
            ...
            bar.advance(f"{item.name} ok")  # one step done; the text goes to the log line
"""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, log_every: int | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.log_every = log_every if log_every is not None else max(1, total // 10)
        self.done = 0
        self.bar = None
        self._next_log = 0

    def start(self) -> "Progress":
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

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, text: str = "", n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.enabled and (self.done >= self._next_log or self.done == self.total):
            print(f"[{self.label}] {self.done}/{self.total} {text}".rstrip(), file=sys.stderr, flush=True)
            self._next_log = self.done + self.log_every

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()
