"""Results dict (``runner.run_bench``) -> ``results.json``, ``report.md``, PNG plots, terminal table.

``write_all(results, out_dir) -> list[Path]`` writes:

* ``results.json`` - the results as is;
* ``report.md`` - setup (model, workload, command, machine, date), the main table (one row per method
  and peer: tok/s, speed-up, mean accepted, TTFT, exact match, peak RSS, status), a speed-up table per
  category, for structured-output workloads a "Structured output" table (``structured.report_lines``),
  divergences, failures and notes. A method that claims losslessness and is not 100% exact
  under greedy is flagged ``NOT EXACT`` at the top of the report and in its table row;
* ``speedup_by_category.png`` (grouped bars, one group per category) and ``tokens_per_s_per_sample.png``
  (one line per contestant), made with matplotlib's Agg backend (skipped with a note when matplotlib is
  missing).

``print_table(results)`` prints the main table with rich to stdout.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

PLOTS = ("speedup_by_category.png", "tokens_per_s_per_sample.png")


def _contestants(results: dict) -> dict:
    return {**results["methods"], **results["peers"]}


def _num(v, fmt: str = "{:.2f}", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


def _exact_cell(s: dict) -> str:
    if s["exact_match_vs_vanilla"] is None:
        return "—"
    pct = f"{100 * s['exact_match_vs_vanilla']:.1f}%"
    return f"**NOT EXACT** {pct}" if s["not_exact"] else pct


def _status_cell(s: dict) -> str:
    status = s["status"]
    if status == "ok" and s.get("n_failed"):
        return f"ok ({s['n_failed']} of {s['n_samples']} samples failed)"
    return status


def main_rows(results: dict) -> list[list[str]]:
    header = ["method", "kind", "tok/s", "speed-up", "mean accepted", "TTFT ms", "exact match", "peak RSS MB",
              "status"]
    rows = [header]
    for label, s in _contestants(results).items():
        rows.append([label, s["kind"], _num(s["tokens_per_s"], "{:.1f}"), _num(s["speedup_vs_vanilla"], "{:.2f}x"),
                     _num(s["mean_accepted_tokens"]), _num(s["ttft_s"] and s["ttft_s"] * 1000, "{:.0f}"),
                     _exact_cell(s), _num(s["peak_rss_mb"], "{:.0f}"), _status_cell(s)])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def category_rows(results: dict) -> list[list[str]]:
    ok = {k: v for k, v in _contestants(results).items() if v["status"] == "ok"}
    vanilla = results["methods"]["vanilla"]
    others = [k for k in ok if k != "vanilla"]
    rows = [["category", "samples", "vanilla tok/s"] + [f"{k} speed-up" for k in others]]
    for cat, n in results["workload"]["categories"].items():
        row = [cat, str(n), _num(vanilla["per_category"][cat]["tokens_per_s"], "{:.1f}")]
        for k in others:
            pc = ok[k]["per_category"].get(cat, {})
            cell = _num(pc.get("speedup_vs_vanilla"), "{:.2f}x")
            if ok[k]["claims_exact"] and results["greedy"] and pc.get("exact_match_vs_vanilla") not in (None, 1.0):
                cell += " (NOT EXACT)"
            row.append(cell)
        rows.append(row)
    return rows


def render_markdown(results: dict, plots: list[str]) -> str:
    m, w, mach = results["model"], results["workload"], results["machine"]
    out = [f"# leaplm bench: {w['name']} ({w['n_samples']} samples)", ""]
    if results["not_exact"]:
        out += [f"> **NOT EXACT**: {', '.join(results['not_exact'])} claim{'s' if len(results['not_exact']) == 1 else ''} "
                "lossless decoding but produced tokens different from vanilla under greedy decoding "
                "(see the divergences below).", ""]
    sampling = "greedy" if results["greedy"] else f"temperature {results['temperature']}"
    out += [
        f"- model: `{m['path']}` ({m['family']}, {m['dtype']}, weights {m.get('quantization') or 'float'}, {m['device']}"
        + (f", compiled in {m['compile_s']:.0f}s" if m.get("compiled") and m.get("compile_s") is not None else "") + ")"
        + (f"; draft `{results['draft_model']}`" if results.get("draft_model") else ""),
        f"- workload: `{w['spec']}` from `{w['source']}`; {len(w['categories'])} categories; "
        f"limit {results['limit'] if results['limit'] is not None else 'none'} per category; turns: {w['turns']}",
        f"- decoding: {sampling}, max {results['max_tokens']} new tokens, batch 1; warm-up {results['warmup']} "
        f"sample(s) per method/peer (not timed); threads {results['threads']}",
        f"- command: `{shlex.join(results['command'])}`",
        f"- date: {results['date']}; benchmark time {results['elapsed_s']:.1f} s",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}"
        + (f", GPU {mach['gpu']}" if mach.get("gpu") else "")
        + (f", {mach['memory_gb']} GB RAM" if mach.get("memory_gb") else ""),
        f"- versions: leaplm {mach['leaplm']} (git {mach['git_commit'] or 'unknown'}), torch {mach['torch']}, "
        f"transformers {mach['transformers']}, python {mach['python']}",
        "",
        "## Results",
        "",
        _md_table(main_rows(results)),
        "",
        "speed-up = tok/s / vanilla tok/s (same run, same prompt ids); mean accepted = output tokens per target "
        "forward pass; exact match = share of samples whose tokens equal vanilla's; peak RSS is process-wide.",
        "",
        "## Speed-up by category",
        "",
        _md_table(category_rows(results)),
        "",
    ]
    for name in plots:
        out += [f"![{name}]({name})", ""]
    from .structured import report_lines

    out += report_lines(results)
    divergent = [(k, s) for k, s in _contestants(results).items()
                 if s["status"] == "ok" and s["exact_match_vs_vanilla"] not in (None, 1.0)]
    if divergent:
        out += ["## Divergences from vanilla", ""]
        for k, s in divergent:
            items = [f"{r['id']} at token {r['first_divergence']}" for r in s["samples"]
                     if r.get("first_divergence") is not None]
            flag = " **NOT EXACT**" if s["not_exact"] else ""
            ref = (s.get("structured") or {}).get("exact_reference") or "vanilla"
            out.append(f"- {k}{flag} (vs {ref}): {len(items)} of {s['n_ok']} samples differ: " + "; ".join(items[:20])
                       + (" ..." if len(items) > 20 else ""))
        out.append("")
    failures = [(k, s) for k, s in _contestants(results).items() if s["status"] != "ok" or s["errors"]]
    if failures:
        out += ["## Skipped and failed", ""]
        for k, s in failures:
            if s["status"] != "ok":
                hint = f" - {s['hint']}" if s.get("hint") else ""
                out.append(f"- {k}: {s['status']}{hint}")
            for e in s["errors"][:10]:
                out.append(f"- {k}, sample {e['id']}: {e['error']}")
        out.append("")
    out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def make_plots(results: dict, out_dir: Path) -> list[str]:
    """The two PNGs; returns the names written ([] when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    ok = {k: v for k, v in _contestants(results).items() if v["status"] == "ok"}
    cats = list(results["workload"]["categories"])

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) * max(1, len(ok)) ** 0.5 + 3), 4.5))
    width = 0.8 / max(1, len(ok))
    for j, (label, s) in enumerate(ok.items()):
        values = [s["per_category"].get(c, {}).get("speedup_vs_vanilla") or 0.0 for c in cats]
        ax.bar([i + j * width for i in range(len(cats))], values, width,
               label=label + (" (NOT EXACT)" if s["not_exact"] else ""))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))])
    ax.set_xticklabels(cats, rotation=30, ha="right")
    ax.set_ylabel("speed-up vs vanilla (tokens/s ratio)")
    ax.set_title(f"Speed-up by category - {results['workload']['name']}, {Path(results['model']['path']).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, s in ok.items():
        xs = [i for i, r in enumerate(s["samples"]) if r["tokens_per_s"] is not None]
        ax.plot(xs, [s["samples"][i]["tokens_per_s"] for i in xs], marker="o", markersize=3, linewidth=1, label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sample (workload order)")
    ax.set_ylabel("tokens / s")
    ax.set_title("Tokens per second per sample")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[1], dpi=110)
    plt.close(fig)
    return list(PLOTS)


def write_all(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(render_markdown(results, plots))
    return [out_dir / "results.json", out_dir / "report.md"] + [out_dir / p for p in plots]


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = main_rows(results)
    w = results["workload"]
    table = Table(title=f"leaplm bench: {w['name']}, {w['n_samples']} samples, max {results['max_tokens']} tokens, "
                        f"{'greedy' if results['greedy'] else 'T=' + str(results['temperature'])}")
    widths = [max(len(r[i]) for r in rows[1:]) if len(rows) > 1 else 4 for i in range(len(rows[0]))]
    for i, h in enumerate(rows[0]):  # values never cut: labels and numbers keep their width, headers wrap
        table.add_column(h, justify="left" if i in (0, 1, 8) else "right", overflow="fold",
                         min_width=min(widths[i], 40) if i != 8 else None)
    for r in rows[1:]:
        table.add_row(*[c.replace("**NOT EXACT**", "[bold red]NOT EXACT[/]") for c in r])
    console = Console() if sys.stdout.isatty() else Console(width=200)  # logs: do not squeeze to 80 columns
    console.print(table)
    if results.get("structured"):
        from .structured import table_rows

        srows = table_rows(results)
        st = Table(title="structured output")
        for i, h in enumerate(srows[0]):
            st.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
        for r in srows[1:]:
            st.add_row(*r)
        console.print(st)
    if results["not_exact"]:
        console.print(f"[bold red]NOT EXACT:[/] {', '.join(results['not_exact'])} differ from vanilla under greedy")
