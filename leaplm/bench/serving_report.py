"""The serving benchmark's results (``serving.run_serving``) -> ``results.json``, ``report.md``,
``requests.jsonl`` and the terminal table.

``write_all(results, out_dir) -> list[Path]`` writes ``results.json`` (the results without the per-request
records), ``report.md`` (setup, one table row per (backend, concurrency), backend settings, errors, notes)
and ``requests.jsonl`` (one line per request: timings, deliveries, token ids, error);
``print_table(results)`` prints the table with rich.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .serving import fmt_num as _fmt


HEADER = ["backend", "C", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors",
          "peak RSS MB", "prefix hit", "exact vs alone", "status"]


def table_rows(results: dict) -> list[list[str]]:
    rows = [HEADER]
    for r in results["rows"]:
        ms = lambda v: _fmt(v * 1000 if v is not None else None, "{:.1f}")  # noqa: E731
        pct = lambda v: _fmt(v * 100 if v is not None else None, "{:.0f}%")  # noqa: E731
        exact = pct(r["exact_match_vs_alone"])
        if r["exact_match_vs_alone"] is not None:
            exact += f" of {r['exact_match_compared']}"
        rows.append([r["method"], str(r["concurrency"]), _fmt(r["requests"], "{}"),
                     _fmt(r["output_tokens_per_s"], "{:.1f}"), ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]),
                     ms(r["itl_p50_s"]), ms(r["itl_p99_s"]), _fmt(r["errors"], "{}"), _fmt(r["peak_rss_mb"], "{:.0f}"),
                     pct(r["prefix_cache_hit_rate"]), exact, r["status"]])
    return rows


def render_markdown(results: dict) -> str:
    import shlex

    m, w = results["machine"], results["workload"]
    lines = ["# leaplm serving benchmark (closed loop)", "",
             f"- model: `{results['model']['path']}` ({results['model']['dtype']}, {results['model']['device']}, "
             f"quantization {results['model']['quantization']})",
             f"- workload: {w['name']} ({w['n_prompts']} prompts usable), max {results['max_tokens']} tokens, greedy",
             f"- concurrency: {', '.join(map(str, results['concurrency']))}; requests per level: "
             + ", ".join(f"C={c}: {n}" for c, n in results["requests"].items()),
             f"- machine: {m.get('cpu')} ({m.get('cores')} cores, {results['threads']} threads), torch {m.get('torch')}, "
             f"transformers {m.get('transformers')}, leaplm {m.get('leaplm')} ({m.get('git_commit')})",
             f"- command: `{shlex.join(results['command'])}`" if results.get("command") else "- command: (library call)",
             f"- date: {results['date']}", ""]
    lines += markdown_table(table_rows(results))
    long_rows = [r for r in results["rows"] if r.get("long_prompt_tokens")]
    if long_rows:
        chunk = results.get("prefill_chunk_s")
        lines += ["", f"## A {results.get('long_prompt_tokens')}-token prompt arriving mid-run", "",
                  f"The slowest step prefilling one chunk ({results.get('prefill_chunk_tokens')} tokens) of that prompt "
                  f"alone: {_fmt(chunk * 1000 if chunk else None, '{:.1f}')} ms (every chunk's step, ms: "
                  + ", ".join(_fmt(t * 1000, "{:.0f}") for t in results.get("prefill_chunk_steps_s") or []) + ").", ""]
        table = [["backend", "C", "long prompt TTFT ms", "ITL p99 ms", "ITL p99 growth ms", "growth / chunk"]]
        for r in long_rows:
            g = r.get("itl_p99_growth_s")
            table.append([r["method"], str(r["concurrency"]), _fmt(r["long_prompt_ttft_s"] * 1000 if r["long_prompt_ttft_s"] else None, "{:.0f}"),
                          _fmt(r["itl_p99_s"] * 1000 if r["itl_p99_s"] else None, "{:.1f}"),
                          _fmt(g * 1000 if g is not None else None, "{:+.1f}"),
                          _fmt(g / chunk if g is not None and chunk else None, "{:.2f}")])
        lines += markdown_table(table)
    infos = {}
    for r in results["rows"]:
        if r["info"] and r["method"] not in infos:
            infos[r["method"]] = r["info"]
    if infos:
        lines += ["", "## Backends", ""]
        lines += [f"- **{name}**: `{json.dumps(info, default=str)}`" for name, info in infos.items()]
    errors = [(r["method"], r["concurrency"], e) for r in results["rows"] for e in r["error_messages"]]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {n} C={c}: {e}" for n, c, e in errors]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def write_all(results: dict, out_dir: Path) -> list[Path]:
    """``results.json`` (without the per-request records), ``report.md``, ``requests.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = results.get("_records", [])
    public = {k: v for k, v in results.items() if k != "_records"}
    (out_dir / "results.json").write_text(json.dumps(public, indent=1, allow_nan=False, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(public))
    with open(out_dir / "requests.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return [out_dir / "results.json", out_dir / "report.md", out_dir / "requests.jsonl"]


def print_table(results: dict) -> None:
    w = results["workload"]
    print_rows(table_rows(results), f"leaplm serving bench: {w['name']}, max {results['max_tokens']} tokens, greedy, "
                                    "closed loop")


def markdown_table(rows: list[list[str]]) -> list[str]:
    """``rows`` (header first) as markdown table lines; the first and last columns left-aligned, the rest right."""
    n = len(rows[0])
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join("---" if i in (0, n - 1) else "---:" for i in range(n)) + "|"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]


def print_rows(rows: list[list[str]], title: str) -> None:
    """``rows`` (header first) as a rich table on stdout (200 columns wide when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(rows[0]):
        table.add_column(h, justify="left" if i in (0, len(rows[0]) - 1) else "right", overflow="fold")
    for r in rows[1:]:
        table.add_row(*r)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
