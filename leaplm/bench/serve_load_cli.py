"""``leaplm bench-serve``: load OpenAI-compatible servers on this machine with streaming chat requests.

    leaplm bench-serve --url URL [--served-model NAME] [--server-pid PID] [--name LABEL] [--model M] ...
    leaplm bench-serve --servers leaplm,llamacpp-server,hf-serve --model M [--llama-server PATH]
                       [--leaplm-args "..."] ...
        common: --concurrency 1,16,64 --requests N --workload spec_bench|builtin|FILE [--limit N]
                [--max-tokens 128] [--timeout-s S] [--level-timeout-s S] [--warmup N] [--api-key KEY] --out DIR

``add_parser(subparsers)`` registers the sub-command (its ``func`` is ``main``); ``main(args) -> int`` runs it.
For each server (the one at ``--url``, or each of ``--servers`` started in turn by ``serve_targets``) and each
concurrency level (ascending): ``--warmup`` untimed requests alone, then ``--requests`` requests with C in
flight (``http_load.run_level``), the server's RSS (its process tree) sampled every 0.2 s. Output in ``--out``:
``results.json`` (schema ``leaplm-bench-serve/1``: setup, ``rows`` per server x level with ``http_load``'s
metrics and ``rss_*``, ``checks`` against the serving targets, notes), ``report.md``, ``requests.jsonl`` (every
request), ``rss_series.json``, ``throughput.png`` and ``rss.png``; the table is printed. Exit status 0, or 1
when a row failed or has errors or truncated responses. ``python -m leaplm.bench.serve_load_cli ARGS`` runs it
without the ``leaplm`` entry point.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import BenchError

SCHEMA = "leaplm-bench-serve/1"
PLOTS = ("throughput.png", "rss.png")
TARGETS = {"throughput_ratio_c16": 1.2, "rss_growth": 1.05}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-serve", help="load OpenAI-compatible servers on this machine (leaplm serve, llama-server, transformers serve)",
        description="Closed-loop HTTP load: C streaming /v1/chat/completions requests in flight until N finished, per "
                    "concurrency level; throughput, TTFT and ITL percentiles, errors, truncated responses, server RSS "
                    "over time. Loopback URLs only.")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server on this machine, e.g. http://127.0.0.1:8000")
    target.add_argument("--servers", help="start these servers in turn on --model: leaplm, llamacpp-server, hf-serve")
    p.add_argument("--model", "-m", default=None,
                   help="known name, .gguf file or HF folder: the model --servers start, and the tokenizer that counts "
                        "output tokens when a server sends no usage (optional with --url)")
    p.add_argument("--served-model", default=None,
                   help="the request body's \"model\" (default: the first id of GET /v1/models, none if that fails)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, to sample its RSS")
    p.add_argument("--name", default="server", help="with --url: the server's label in the report (default: server)")
    p.add_argument("--concurrency", "-c", default="1,16,64", help="requests in flight, comma-separated (default 1,16,64)")
    p.add_argument("--requests", "-n", default="100",
                   help="requests per level: N for every level, or one count per --concurrency entry in its order, "
                        "e.g. -c 1,16,64 -n 32,320,1000 (default 100)")
    p.add_argument("--workload", "-w", default="spec_bench",
                   help="spec_bench[:PATH] | builtin | FILE.jsonl: first turns, categories interleaved, cycled")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each category")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="a request still running after this many seconds is cancelled as an error (default 600)")
    p.add_argument("--level-timeout-s", type=float, default=3600.0,
                   help="time bound of one server x level run: then nothing more is sent and what runs is cancelled "
                        "(default 3600)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent alone before each level (default 1)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--llama-server", default=None, help="llama-server binary (default: the newest one "
                                                        "scripts/build-llama-server built, else PATH)")
    p.add_argument("--leaplm-args", default="", help="extra `leaplm serve` flags for --servers leaplm, e.g. \"-q int8\"")
    p.add_argument("--threads", type=int, default=None, help=f"llama-server threads (default: {os.cpu_count()})")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="seconds a started server may take to be ready")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar / log lines")
    p.add_argument("--out", "-o", required=True, type=Path, help="output folder")


# --------------------------------------------------------------------------- setup


def workload_messages(spec: str, limit: int | None) -> tuple[list[list[dict]], list[str], dict]:
    """The workload's first turns as chat messages, categories interleaved -> ``(messages, ids, workload info)``."""
    from .serving import interleave_categories
    from .workloads import load_workload

    w = load_workload(spec, limit)
    if w.constrained or any(s.prompt_ids is not None for s in w.samples):
        raise BenchError(f"workload {spec!r}: bench-serve sends chat messages; give text prompts without structured-"
                         "output fields (spec_bench, builtin, or a FILE.jsonl of prompt / turns rows)")
    order = interleave_categories(w.samples)
    messages = [[{"role": "user", "content": s.turns[0]}] for s in order]
    return messages, [f"{s.category}/{s.id}" for s in order], {"spec": spec, "name": w.name, "source": w.source,
                                                              "n_prompts": len(order)}


def served_model(base_url: str, api_key: str | None) -> str | None:
    """The first model id of ``GET /v1/models``; None when the server does not answer it."""
    import urllib.request

    req = urllib.request.Request(base_url + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
            data = json.loads(r.read()).get("data") or []
        return str(data[0]["id"]) if data else None
    except Exception:  # noqa: BLE001 - optional: the body then has no "model"
        return None


class Tokens:
    """The model's tokenizer for counting (``count(text)``) and prompt lengths (``prompt_len(messages)``)."""

    def __init__(self, model: str) -> None:
        from .. import hub
        from ..tokenizer import Tokenizer

        self.path = hub.resolve(model, download=False)
        self.tok = Tokenizer.from_path(self.path)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def prompt_len(self, messages: list[dict]) -> int:
        return len(self.tok.apply_chat_template(messages))


# --------------------------------------------------------------------------- the runs


class Bench:
    """The state of one ``bench-serve`` run: settings, rows, per-request records, RSS series, progress."""

    def __init__(self, args, levels: list[int], messages: list[list[dict]], tokens: Tokens | None) -> None:
        from ..progress import Progress

        self.args, self.levels, self.messages, self.tokens = args, levels, messages, tokens
        self.rows: list[dict] = []
        self.records: list[dict] = []
        self.rss_series: dict[str, list[list]] = {}
        n_servers = 1 if args.url else len(args.servers.split(","))
        self.progress = Progress(n_servers * sum(args.level_requests.values()), "bench-serve", args.progress)

    def log(self, text: str) -> None:
        if self.args.progress:
            print(f"[bench-serve] {text}", file=sys.stderr, flush=True)

    def run_server(self, name: str, make_server, per_level: bool, info: dict, url: str | None = None,
                   pid: int | None = None) -> None:
        """Every level on one server: ``make_server(c)`` -> an unstarted ``ServerSubprocess`` (``per_level``: a
        fresh one per level), or the running server at ``url`` (RSS sampled when ``pid`` is given)."""
        from .http_load import rss_sampler
        from .serving import error_text

        server, sampler, t_origin = None, None, time.perf_counter()
        series = self.rss_series.setdefault(name, [])
        failed = None
        try:
            for c in self.levels:
                if failed is not None:
                    self.skip(name, c, failed, info)
                    continue
                if make_server is not None and (server is None or per_level):
                    self._stop(server, sampler, series, t_origin)
                    server = sampler = None
                    try:
                        server = make_server(c)
                        server.start()
                    except Exception as e:  # noqa: BLE001 - its rows say why
                        server = None
                        self.skip(name, c, f"failed: {error_text(e)}", info)
                        if not per_level:
                            failed = f"failed: the server did not start ({error_text(e)})"
                        continue
                    url, sampler = server.url, rss_sampler(server.pid)
                    info = {**info, "pid": server.pid}
                elif sampler is None and pid is not None:
                    sampler = rss_sampler(pid)
                self.rows.append(self.run_one(name, c, url, sampler, info))
        finally:
            self._stop(server, sampler, series, t_origin)

    @staticmethod
    def _stop(server, sampler, series: list, t_origin: float) -> None:
        if sampler is not None:
            sampler.stop()
            series += [[round(t - t_origin, 3), round(v / 2**20, 1)] for t, v in sampler.series]
        if server is not None:
            server.stop()

    def skip(self, name: str, c: int, status: str, info: dict | None = None) -> None:
        self.rows.append(empty_row(name, c, status, info))
        self.log(f"{name} C={c}: {status}")

    def run_one(self, name: str, c: int, url: str, sampler, info: dict) -> dict:
        """One level on the server at ``url``: warm-up, the timed run, its row."""
        from .http_load import (RSS_MARK, count_tokens, leaplm_stats, level_metrics, record_json, rss_summary,
                                run_level_sync)
        from .serving import fmt_num

        a = self.args
        model = a.served_model or served_model(url, a.api_key)
        info = {**info, "served_model": model, "url": url}
        common = dict(max_tokens=a.max_tokens, model=model, request_timeout=a.timeout_s, api_key=a.api_key,
                      level_timeout=a.level_timeout_s)
        if a.warmup > 0:   # untimed, alone, on prompts from the end of the list
            warm = run_level_sync(url, self.messages[::-1], 1, a.warmup, **common)
            bad = [r for r in warm.records if not r.ok]
            if bad:
                status = f"failed: the warm-up request failed: {bad[0].error or 'truncated response'}"
                self.log(f"{name} C={c}: {status}")
                return empty_row(name, c, status, info)
        marks: dict[str, float] = {}

        def on_finish(rec) -> None:
            self.progress.advance(f"{name} C={c}")
            marks["n"] = marks.get("n", 0) + 1
            if marks["n"] == RSS_MARK and sampler is not None:
                sampler.sample()
                marks["t"] = time.perf_counter()

        self.progress.describe(f"{name} C={c}")
        if sampler is not None:
            sampler.sample()
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = run_level_sync(url, level_prompts(self.messages, a.level_requests, c), c, a.level_requests[c],
                                on_finish=on_finish, **common)
        t1 = time.perf_counter()
        info["client_cpu_s"] = round(time.process_time() - cpu0, 3)   # this process: the client's own CPU
        if sampler is not None:
            sampler.sample()
        count_tokens(result.records, self.tokens.count if self.tokens else None)
        info["output_tokens_counted_by"] = {k: sum(r.counted_by == k for r in result.records)
                                            for k in ("usage", "tokenizer", "chunks")}
        rss = rss_summary(sampler.series if sampler is not None else [], t0, marks.get("t"), t1)
        row = {"server": name, "concurrency": c, "status": "ok", **level_metrics(result), **rss,
               "error_messages": sorted({r.error for r in result.records if r.error})[:5],
               "leaplm_stats": leaplm_stats(result.records), "info": info}
        self.records += [{"server": name, "concurrency": c, **record_json(r)} for r in result.records]
        self.log(f"{name} C={c}: {fmt_num(row['output_tokens_per_s'], '{:.1f}')} tok/s, TTFT p99 "
                 f"{fmt_num(row['ttft_p99_s'], '{:.3f}')} s, {row['errors']} errors, {row['truncated']} truncated")
        return row


def empty_row(name: str, c: int, status: str, info: dict | None = None) -> dict:
    """The row of a level that did not run (``status``: ``skipped: ...`` or ``failed: ...``): metrics None."""
    from .http_load import LEVEL_METRICS, RSS_FIELDS

    return {"server": name, "concurrency": c, "status": status, **dict.fromkeys(LEVEL_METRICS),
            **dict.fromkeys(RSS_FIELDS), "error_messages": [], "leaplm_stats": None, "info": dict(info or {})}


# --------------------------------------------------------------------------- results


def checks(rows: list[dict]) -> list[dict]:
    """The serving targets, from the rows (leaplm against llamacpp-server at the same level; integrity of every
    row with at least ``RSS_MARK`` requests): ``{"check", "value", "target", "pass"}``; none without those rows."""
    from .http_load import RSS_MARK

    by = {(r["server"], r["concurrency"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (server, c), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if server != "leaplm":
            continue
        peer = by.get(("llamacpp-server", c))
        if peer is not None:
            if c == 16 and r["output_tokens_per_s"] and peer["output_tokens_per_s"]:
                ratio = r["output_tokens_per_s"] / peer["output_tokens_per_s"]
                goal = TARGETS["throughput_ratio_c16"]
                out.append({"check": "leaplm tok/s / llamacpp-server tok/s at C=16", "value": ratio,
                            "target": f">= {goal}", "pass": ratio >= goal})
            if r["ttft_p99_s"] is not None and peer["ttft_p99_s"] is not None:
                out.append({"check": f"leaplm TTFT p99 <= llamacpp-server's at C={c}", "value": r["ttft_p99_s"],
                            "target": f"<= {peer['ttft_p99_s']:.4f} s", "pass": r["ttft_p99_s"] <= peer["ttft_p99_s"]})
    for (server, c), r in sorted(by.items()):
        if r["submitted"] >= RSS_MARK:
            bad = r["errors"] + r["truncated"] + r["not_submitted"]
            out.append({"check": f"{server} C={c}: errors + truncated + not submitted", "value": bad, "target": "0",
                        "pass": bad == 0})
            g = r["rss_end_over_after_100"]
            if g is not None:
                out.append({"check": f"{server} C={c}: RSS at the end / after {RSS_MARK} requests", "value": g,
                            "target": f"<= {TARGETS['rss_growth']}", "pass": g <= TARGETS["rss_growth"]})
    return out


NOTES = [
    "closed loop: C streaming POST /v1/chat/completions in flight; the next request is sent the moment one ends; "
    "prompts: the workload's first turns, categories interleaved, cycled when --requests exceeds them; "
    "temperature 0, stream_options.include_usage; every server gets the same requests in the same order",
    "completed = no error and not truncated; truncated = the stream ended without a finish_reason or without usage; "
    "errors: HTTP status, an SSE error chunk, a timeout, a broken connection",
    "output_tokens_per_s = output tokens of the completed requests (usage.completion_tokens; else counted with the "
    "model's tokenizer) / wall time (first submission to last end); TTFT = submission -> first chunk with text; "
    "ITL = gap between a request's consecutive text chunks, a chunk of k tokens counting as k gaps of gap/k; "
    "percentiles interpolate linearly",
    "server RSS: the server process and its children (transformers serve runs its model in a child), sampled every "
    "0.2 s; rss_after_100 = right after the 100th request of the level ended; llama-server restarts per level "
    "(--parallel C), the other servers serve every level in one process",
    "prompt caching stays as each server has it by default (llama-server's per-slot cache_prompt, leaplm's prefix "
    "cache, transformers' none); llama-server runs the GGUF's own quantized weights, transformers dequantized float "
    "weights, leaplm its default for the file (int8 for a low-bit GGUF on CPU unless --leaplm-args says otherwise)",
]


def build_results(args, levels, rows, workload, tokens, started: float) -> dict:
    from .runner import machine_info

    return {
        "schema": SCHEMA, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": _command(args), "machine": machine_info(args.threads or os.cpu_count() or 1),
        "model": {"arg": args.model, "path": str(tokens.path) if tokens else None},
        "target": {"url": args.url, "servers": args.servers}, "workload": workload, "concurrency": levels,
        "requests": {str(c): n for c, n in args.level_requests.items()}, "max_tokens": args.max_tokens,
        "temperature": 0.0, "warmup": args.warmup,
        "request_timeout_s": args.timeout_s, "level_timeout_s": args.level_timeout_s,
        "elapsed_s": time.perf_counter() - started, "rows": rows, "checks": checks(rows),
        "notes": list(NOTES),
    }


def _command(args) -> list[str]:
    argv = getattr(args, "argv", None)
    return list(argv) if argv is not None else ["leaplm", "bench-serve", *sys.argv[1:]]


HEADER = ["server", "C", "done/asked", "errors", "truncated", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms",
          "ITL p50 ms", "ITL p99 ms", "RSS start MB", "RSS @100 MB", "RSS end MB", "RSS peak MB", "end/@100", "status"]


def table_rows(results: dict) -> list[list[str]]:
    from .serving import fmt_num as f

    ms = lambda v: f(v * 1000 if v is not None else None, "{:.1f}")  # noqa: E731
    rows = [HEADER]
    for r in results["rows"]:
        asked = r["requests"] or results["requests"].get(str(r["concurrency"]))
        rows.append([r["server"], str(r["concurrency"]), f"{f(r['completed'], '{}')}/{asked}",
                     f(r["errors"], "{}"), f(r["truncated"], "{}"), f(r["output_tokens_per_s"], "{:.1f}"),
                     f(r["requests_per_s"], "{:.2f}"), ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["itl_p50_s"]),
                     ms(r["itl_p99_s"]), f(r["rss_start_mb"], "{:.0f}"), f(r["rss_after_100_mb"], "{:.0f}"),
                     f(r["rss_end_mb"], "{:.0f}"), f(r["rss_peak_mb"], "{:.0f}"), f(r["rss_end_over_after_100"], "{:.3f}"),
                     r["status"] + (" (time bound hit)" if r.get("hit_time_bound") else "")])
    return rows


def render_markdown(results: dict, plots: list[str]) -> str:
    from .serving import fmt_num
    from .serving_report import markdown_table

    m, w = results["machine"], results["workload"]
    lines = ["# leaplm bench-serve: HTTP load (closed loop)", "",
             f"- target: {results['target']['url'] or 'servers ' + results['target']['servers']}; model "
             f"`{results['model']['path'] or results['model']['arg'] or '-'}`",
             f"- workload: {w['name']} ({w['n_prompts']} prompts); requests per level: "
             + ", ".join(f"C={c}: {n}" for c, n in results["requests"].items()) + f"; max "
             f"{results['max_tokens']} tokens, temperature 0, streaming with usage",
             f"- concurrency: {', '.join(map(str, results['concurrency']))}; request timeout "
             f"{results['request_timeout_s']:g} s, "
             f"level time bound {results['level_timeout_s']:g} s, {results['warmup']} warm-up request(s) per level",
             f"- machine: {m.get('cpu')} ({m.get('cores')} cores), leaplm {m.get('leaplm')} ({m.get('git_commit')}), "
             f"transformers {m.get('transformers')}",
             f"- command: `{shlex.join(results['command'])}`", f"- date: {results['date']}", ""]
    lines += markdown_table(table_rows(results))
    if results["checks"]:
        lines += ["", "## Targets", "", "| check | value | target | pass |", "|---|---:|---|---|"]
        lines += [f"| {c['check']} | {fmt_num(c['value'], '{:.4g}')} | {c['target']} | {'yes' if c['pass'] else '**NO**'} |"
                  for c in results["checks"]]
    infos = {}
    for r in results["rows"]:
        infos.setdefault(r["server"], {k: v for k, v in r["info"].items() if k != "pid"})
    lines += ["", "## Servers", ""] + [f"- **{n}**: `{json.dumps(i, default=str)}`" for n, i in infos.items()]
    stats = [(r["server"], r["concurrency"], r["leaplm_stats"]) for r in results["rows"] if r.get("leaplm_stats")]
    if stats:
        lines += ["", "## leaplm stats (means over the completed requests)", ""]
        lines += [f"- {n} C={c}: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items()) for n, c, s in stats]
    errors = [(r["server"], r["concurrency"], e) for r in results["rows"] for e in r["error_messages"]]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {n} C={c}: {e}" for n, c, e in errors]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def make_plots(results: dict, rss_series: dict, out_dir: Path) -> list[str]:
    """``throughput.png`` (tok/s and TTFT p99 vs concurrency, one line per server) and ``rss.png`` (server RSS
    over time); [] with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["server"] for r in ok):
        mine = [r for r in ok if r["server"] == name]
        ax1.plot([r["concurrency"] for r in mine], [r["output_tokens_per_s"] or 0 for r in mine], marker="o", label=name)
        ax2.plot([r["concurrency"] for r in mine], [(r["ttft_p99_s"] or 0) * 1000 for r in mine], marker="o", label=name)
    for ax, label in ((ax1, "output tokens / s"), (ax2, "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["concurrency"], [str(c) for c in results["concurrency"]])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench-serve: {results['workload']['name']}, max {results['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS[0], dpi=110)
    plt.close(fig)
    written = [PLOTS[0]]
    if any(rss_series.values()):
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for name, pts in rss_series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1, label=name)
        ax.set_xlabel("seconds since the server was started (or the first level, with --url)")
        ax.set_ylabel("server RSS (MiB, process tree)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / PLOTS[1], dpi=110)
        plt.close(fig)
        written.append(PLOTS[1])
    return written


def write_all(results: dict, records: list[dict], rss_series: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, rss_series, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(results, plots))
    with open(out_dir / "requests.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out_dir / "rss_series.json").write_text(json.dumps(rss_series) + "\n")
    return [out_dir / n for n in ("results.json", "report.md", "requests.jsonl", "rss_series.json", *plots)]


# --------------------------------------------------------------------------- the command


def level_prompts(messages: list, level_requests: dict[int, int], c: int) -> list:
    """The prompts of level ``c``: the list rotated past the prompts the lower levels used, so that a server kept
    running across levels (leaplm serve) finds no earlier level's prompt in its prefix cache; every server gets the
    same prompts at the same level."""
    offset = sum(n for level, n in level_requests.items() if level < c) % max(1, len(messages))
    return messages[offset:] + messages[:offset]


def level_requests(concurrency: str, requests: str) -> dict[int, int]:
    """``--requests`` -> ``{level: requests}`` (levels ascending): one count for every level, or one per
    ``--concurrency`` entry, paired in the order given."""
    from .serving import parse_concurrency

    given = [c.strip() for c in str(concurrency).split(",") if c.strip()]
    try:
        counts = [int(n) for n in str(requests).split(",") if n.strip()]
    except ValueError:
        raise BenchError(f"--requests {requests!r}: give an integer, or one per --concurrency level "
                         "(e.g. 32,320,1000)") from None
    if len(counts) == 1:
        counts *= len(given)
    if len(counts) != len(given) or any(n < 1 for n in counts):
        raise BenchError(f"--requests {requests!r}: give one integer >= 1, or one per --concurrency level "
                         f"({len(given)} here)")
    pairs = dict(zip((parse_concurrency(c)[0] for c in given), counts))
    return {c: pairs[c] for c in parse_concurrency(concurrency)}


def _validate(args) -> list[int]:
    from ..cli_common import at_least
    from .http_load import check_loopback
    from .serving import parse_concurrency

    levels = parse_concurrency(args.concurrency)
    args.level_requests = level_requests(args.concurrency, args.requests)
    at_least("--max-tokens", args.max_tokens, 1)
    at_least("--warmup", args.warmup, 0)
    at_least("--threads", args.threads, 1)
    for flag, v in (("--timeout-s", args.timeout_s), ("--level-timeout-s", args.level_timeout_s),
                    ("--startup-timeout-s", args.startup_timeout_s)):
        if not v > 0:
            raise BenchError(f"{flag} must be > 0, got {v}")
    if args.url:
        args.url = check_loopback(args.url)
    elif not args.model:
        raise BenchError("--servers needs --model (the model every server loads)")
    elif args.server_pid is not None:
        raise BenchError("--server-pid goes with --url; --servers samples the servers it starts")
    return levels


def main(args) -> int:
    from ..cli_common import prepare_out_dir
    from .serve_targets import parse_servers, plan_server
    from .serving_report import print_rows

    levels = _validate(args)
    names = parse_servers(args.servers) if args.servers else []
    prepare_out_dir(args.out)
    messages, _, workload = workload_messages(args.workload, args.limit)
    tokens = Tokens(args.model) if args.model else None
    started = time.perf_counter()
    bench = Bench(args, levels, messages, tokens)
    longest = 0
    with bench.progress:
        if args.url:
            bench.run_server(args.name, None, False, {"url": args.url}, url=args.url, pid=args.server_pid)
        for name in names:
            longest = longest or max(map(tokens.prompt_len, messages))
            plan = plan_server(name, model_path=tokens.path, max_concurrency=max(levels), longest_prompt=longest,
                               max_tokens=args.max_tokens, threads=args.threads or os.cpu_count() or 1,
                               log_dir=args.out, llama_server=args.llama_server,
                               leaplm_args=shlex.split(args.leaplm_args), startup_timeout=args.startup_timeout_s)
            if isinstance(plan, str):
                for c in levels:
                    bench.skip(name, c, plan)
                continue
            bench.log(f"{name}: starting")
            bench.run_server(name, plan.make, plan.per_level, plan.info)
    results = build_results(args, levels, bench.rows, workload, tokens, started)
    files = write_all(results, bench.records, bench.rss_series, args.out)
    print_rows(table_rows(results), f"bench-serve: {workload['name']}, max {args.max_tokens} tokens, requests per "
                                    "level: " + ", ".join(f"C={c}: {n}" for c, n in args.level_requests.items()))
    for c in results["checks"]:
        print(f"{'ok  ' if c['pass'] else 'FAIL'} {c['check']}: {c['value']:.4g} (target {c['target']})")
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    bad = [r for r in bench.rows if r["status"].startswith("failed") or (r["errors"] or 0) + (r["truncated"] or 0) > 0]
    return 1 if bad else 0


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name) and run, as ``leaplm bench-serve`` would."""
    from .cli import run_command

    return run_command("bench-serve", add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
