"""``leaplm bench``: measure leaplm's decoding methods against vanilla and peer engines, same run.

    leaplm bench [--model M] [--draft-model D] --workload W [--limit N] [--max-tokens N]
                 [--methods m1,m2:k=v] [--peers hf,llamacpp] [--temperature T] [--threads N]
                 [--warmup N] [--jump-forward on|off|both] --out DIR
    leaplm bench --concurrency 1,4,16,64 [--requests N] --workload W [--methods ...]
                 [--peers llamacpp-server,hf-serve] [--llama-server PATH] --out DIR

``add_parser(subparsers)`` registers the sub-command (its ``func`` is ``main``); ``main(args) -> int``
runs it and writes ``DIR/results.json``, ``DIR/report.md``, ``DIR/outputs.jsonl`` and the PNG plots,
then prints the main table. With ``--concurrency`` it runs the closed-loop serving benchmark instead
(``serving_sweep.run_serving``; docs/serving-bench.md) and writes ``results.json``, ``report.md`` and
``requests.jsonl``. ``python -m leaplm.bench.cli ARGS`` runs it without the ``leaplm`` entry point.
Errors a user can cause raise ``LeapLMError`` (printed as one ``error:`` line by the CLI).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import BenchError
from .methods import METHODS
from .peers import KNOWN_PEERS
from .serving import SERVING_PEERS


def _help_methods() -> str:
    return ", ".join(sorted(METHODS))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark decoding methods vs vanilla and peer engines (Spec-Bench protocol)",
        description="Run every sample with vanilla decoding, then each --methods entry and each --peers engine, "
                    "interleaved, on identical prompt token ids; write results.json, report.md and plots to --out.")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="known name, .gguf file or HF folder (default: smollm2-135m-instruct)")
    p.add_argument("--draft-model", default=None, help="draft model for methods that use one and the hf_assisted peer")
    p.add_argument("--workload", "-w", required=True,
                   help="spec_bench[:PATH] | humaneval[:PATH] | builtin | json[:PATH] | FILE.jsonl "
                        "({prompt} | {turns} | {prompt_ids}, optional id, category, json_schema | regex | grammar)")
    p.add_argument("--jump-forward", choices=["on", "off", "both"], default="on",
                   help="structured-output workloads (json): constrained runs with jump-forward on (default), off, "
                        "or both side by side")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each category")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per generation (default 256)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated leaplm methods besides vanilla (always first), knobs as name:k=v[:k=v]; "
                        f"known: {_help_methods()}")
    p.add_argument("--peers", default=None, help=f"comma-separated peer engines: {', '.join(KNOWN_PEERS)}; with "
                                                 f"--concurrency: {', '.join(SERVING_PEERS)}")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="base seed when --temperature > 0")
    p.add_argument("--threads", type=int, default=None, help=f"torch / llama.cpp threads (default: {os.cpu_count()})")
    p.add_argument("--warmup", type=int, default=1, help="warm-up samples run by every method/peer, not timed")
    p.add_argument("--dtype", default=None, help="auto (default) | float32 | bfloat16 | float16")
    p.add_argument("--quantization", "-q", default=None,
                   help="target weights for leaplm's methods: none (default) | int8 | int4 (peers keep their own)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile leaplm's decode step for every method (compile time reported, not timed)")
    g = p.add_argument_group("serving (closed loop; docs/serving-bench.md)")
    g.add_argument("--concurrency", default=None,
                   help="comma-separated requests in flight, e.g. 1,4,16,64: run the closed-loop serving benchmark "
                        "(continuous-batching engine vs --peers llamacpp-server,hf-serve) instead of batch 1")
    g.add_argument("--requests", type=int, default=None,
                   help="requests finished per concurrency level (default 2 x concurrency, at most the prompts "
                        "available; the concurrency-1 run covers every level's prompts)")
    g.add_argument("--llama-server", default=None,
                   help="llama.cpp llama-server binary for the llamacpp-server peer (default: the newest "
                        "~/.cache/leaplm/llama-server/*/llama-server built by scripts/build-llama-server, else PATH)")
    g.add_argument("--long-prompt", type=int, default=None, metavar="TOKENS",
                   help="also run every level above 1 with one TOKENS-token prompt arriving mid-run (rows '+long': its "
                        "TTFT and how much the other streams' ITL p99 grows, against one prefill chunk's time)")
    g.add_argument("--request-timeout", type=float, default=900.0,
                   help="seconds before an unfinished serving request is aborted and counted as an error")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar / log lines")
    p.add_argument("--out", "-o", required=True, type=Path, help="output folder")


def _command(args) -> list[str]:
    """The exact argv when this process was started as the bench command, else rebuilt from ``args``."""
    argv = getattr(args, "argv", None)
    if argv is not None:
        return list(argv)
    if "bench" in sys.argv[1:2] or sys.argv[0].endswith(("leaplm/bench/cli.py", "leaplm.bench.cli")):
        return [Path(sys.argv[0]).name] + sys.argv[1:]
    rebuilt = ["leaplm", "bench"]
    for flag, value in [("--model", args.model), ("--draft-model", args.draft_model), ("--workload", args.workload),
                        ("--limit", args.limit), ("--max-tokens", args.max_tokens), ("--methods", args.methods),
                        ("--peers", args.peers), ("--temperature", args.temperature), ("--threads", args.threads),
                        ("--warmup", args.warmup), ("--dtype", args.dtype), ("--quantization", args.quantization), ("--device", args.device),
                        ("--jump-forward", None if getattr(args, "jump_forward", "on") == "on" else args.jump_forward),
                        ("--compile", True if getattr(args, "compile", False) else None),
                        ("--concurrency", getattr(args, "concurrency", None)),
                        ("--requests", getattr(args, "requests", None)),
                        ("--llama-server", getattr(args, "llama_server", None)),
                        ("--out", args.out)]:
        if value is not None:
            rebuilt += [flag, str(value)]
    return rebuilt


def main(args) -> int:
    from ..cli_common import check_device, prepare_out_dir
    from .report import print_table, write_all
    from .runner import BenchConfig, run_bench

    check_device(args.device)
    prepare_out_dir(args.out)   # a folder that cannot be written fails now, not after the whole run
    if getattr(args, "concurrency", None):
        return serving_main(args)
    cfg = BenchConfig(
        workload=args.workload, model=args.model, draft_model=args.draft_model, limit=args.limit,
        max_tokens=args.max_tokens, methods=args.methods, peers=args.peers, temperature=args.temperature,
        threads=args.threads, warmup=args.warmup, dtype=args.dtype, quantization=args.quantization, device=args.device, seed=args.seed,
        out=args.out, command=_command(args), progress=getattr(args, "progress", True),
        jump_forward=getattr(args, "jump_forward", "on"), compile=getattr(args, "compile", False))
    results = run_bench(cfg)
    files = write_all(results, args.out)
    print_table(results)
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 1 if results["not_exact"] else 0


def serving_main(args) -> int:
    """``--concurrency``: the closed-loop serving benchmark (``serving_sweep.run_serving``); exit status 0, or 1 when a
    backend that ran produced an error or a row failed."""
    from .serving import ServingConfig, parse_concurrency
    from .serving_sweep import run_serving
    from .serving_report import print_table, write_all

    if args.temperature != 0:
        raise BenchError("--concurrency runs greedy decoding only (exact match vs alone compares token ids); "
                         "drop --temperature")
    if getattr(args, "jump_forward", "on") != "on":
        raise BenchError("--jump-forward does not apply to --concurrency (structured-output workloads are not served)")
    cfg = ServingConfig(
        workload=args.workload, concurrency=parse_concurrency(args.concurrency), model=args.model,
        draft_model=args.draft_model, limit=args.limit, requests=args.requests, max_tokens=args.max_tokens,
        methods=args.methods, peers=args.peers, threads=args.threads, warmup=args.warmup, dtype=args.dtype,
        quantization=args.quantization, device=args.device, compile=getattr(args, "compile", False),
        llama_server=args.llama_server, request_timeout=args.request_timeout, out=args.out,
        command=_command(args), progress=getattr(args, "progress", True), long_prompt=args.long_prompt)
    if args.long_prompt is not None and args.long_prompt < 1:
        raise BenchError(f"--long-prompt must be >= 1 tokens, got {args.long_prompt}")
    results = run_serving(cfg)
    files = write_all(results, args.out)
    print_table(results)
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    bad = [r for r in results["rows"] if r["status"].startswith("failed") or (r["errors"] or 0) > 0]
    return 1 if bad else 0


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name) and run, as ``leaplm bench`` would."""
    return run_command("bench", add_arguments, main, argv)


def run_command(name: str, add_args, command, argv: list[str]) -> int:
    """``leaplm NAME ARGV`` without the entry point: parse with ``add_args(parser)``, run ``command(args)``; a
    ``LeapLMError`` is one ``error:`` line and exit status 2 (raised with ``LEAPLM_DEBUG`` set)."""
    from ..errors import LeapLMError

    parser = argparse.ArgumentParser(prog=f"leaplm {name}")
    add_args(parser)
    args = parser.parse_args(argv)
    args.argv = ["leaplm", name] + list(argv)
    try:
        return command(args)
    except LeapLMError as e:
        if os.environ.get("LEAPLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
