"""The ``leaplm`` command: generate | chat | models | profile | bench | eval.

Errors a user can cause (bad path, corrupt file, bad sampling values, prompt too long) print one
``error: ...`` line and exit with status 2 — no traceback. ``LEAPLM_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import LeapLMError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="known name (see `leaplm models`), .gguf file, HF folder or hub id; default: smollm2-135m-instruct")
    p.add_argument("--dtype", default=None, help="auto (default: float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + generated tokens")
    p.add_argument("--quantization", "-q", default="auto",
                   help="auto (default: int8 for a low-bit GGUF file on CPU, else float) | none (float weights, "
                        "the exact checkpoint) | int8: per-channel int8 weights (leaplm's VNNI kernel or fbgemm, CPU), several times faster, lossy | "
                        "int4: 4-bit groups of 32 (as GGUF Q4_1; leaplm's C++ kernel, CPU), half int8's bytes, lossier")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (about a minute at every load for SmolLM2 int8 on 2 cores; faster decoding of small models on CPU)")
    p.add_argument("--spec", default=None, choices=["prompt_lookup", "copyspec", "recycling", "aded", "lookahead", "retrieval", "draft", "rasd"],
                   help="lossless speculative decoding method (default: none; --draft-model implies draft)")
    p.add_argument("--draft-model", default=None,
                   help="draft model for --spec draft or rasd: known name, .gguf or HF folder with the target's tokenizer")
    p.add_argument("--corpus", default=None,
                   help="for --spec retrieval or rasd: a text file or folder of text files to draft from (REST datastore)")
    p.add_argument("--tree", type=int, default=None, metavar="TOP_K",
                   help="for --spec draft or rasd: draft a token tree branching into the draft's TOP_K best tokens")
    p.add_argument("--num-draft", type=int, default=None,
                   help="most draft tokens (tree nodes) per step (default: the method's, 8 prompt_lookup / "
                        "10 copyspec / 24 recycling, aded, retrieval / 16 lookahead / 6 draft)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_structured_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("structured output (at most one; see docs/structured-output.md)")
    s.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is one JSON instance of the JSON Schema in FILE")
    s.add_argument("--regex", metavar="R", default=None, help="the whole output matches regular expression R")
    s.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output follows the Lark (llguidance dialect) or GBNF grammar in FILE")
    s.add_argument("--json-object", action="store_true", help="the output is a JSON object")


def _read_text(flag: str, path: str) -> str:
    from .errors import InvalidParamsError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParamsError(f"{flag}: cannot read {path!r}: {e.strerror if isinstance(e, OSError) else e}") from None


def _structured(args) -> dict:
    """``--json-schema FILE`` / ``--regex R`` / ``--grammar FILE`` / ``--json-object`` -> SamplingParams fields."""
    import json

    from .errors import InvalidConstraintError

    out: dict = {}
    if getattr(args, "json_schema", None) is not None:
        text = _read_text("--json-schema", args.json_schema)
        try:
            out["json_schema"] = json.loads(text)
        except ValueError as e:
            raise InvalidConstraintError(f"--json-schema: {args.json_schema!r} is not valid JSON: {e}") from None
    if getattr(args, "regex", None) is not None:
        out["regex"] = args.regex
    if getattr(args, "grammar", None) is not None:
        out["grammar"] = _read_text("--grammar", args.grammar)
    if getattr(args, "json_object", False):
        out["json_object"] = True
    return out


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
        **_structured(args),
    )


def _speculative(args) -> dict | None:
    from .errors import InvalidParamsError

    num_draft = getattr(args, "num_draft", None)
    method = getattr(args, "spec", None) or ("draft" if getattr(args, "draft_model", None) else None)
    if method is None:
        if num_draft is not None:
            raise InvalidParamsError("--num-draft needs --spec (or --draft-model)")
        return None
    spec: dict = {"method": "draft_model" if method == "draft" else method}
    # options that belong to one method: (argument, flag, that method, the knob it sets, what it needs there)
    for attr, flag, owner, knob, needed in (
            ("draft_model", "--draft-model", "draft", "model", "NAME_OR_PATH"),
            ("corpus", "--corpus", "retrieval", "corpus", "PATH (a text file or a folder of text files)"),
            ("tree", "--tree", "draft", "tree_top_k", None)):
        value = getattr(args, attr, None)
        given = value is not None and value != ""
        owners = (owner, "rasd")   # rasd takes the draft model's and retrieval's options
        if method in owners and needed and not given:
            raise InvalidParamsError(f"--spec {method} needs {flag} {needed}")
        if given:
            if method not in owners:
                raise InvalidParamsError(f"{flag} is only used by --spec {' or '.join(owners)}, not --spec {method}")
            spec[knob] = value
    if num_draft is not None:
        spec["num_draft"] = num_draft
    return spec


def _load(args):
    from .llm import LLM

    started = time.perf_counter()
    compiling = " and compiling its decode step (up to a few minutes the first time)" if getattr(args, "compile", False) else ""
    with _status(f"loading {args.model or 'smollm2-135m-instruct'}{compiling}"):
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  speculative=_speculative(args), quantization=getattr(args, "quantization", None),
                  compile=getattr(args, "compile", False))
    weights = f", {llm.quantization} weights" if llm.quantization else ""
    compiled = f", compiled in {llm.compile_s:.1f}s" if llm.compile_s is not None else ""
    _info(f"loaded {llm.model_path.name} ({llm.config.family}, {llm.dtype}{weights}, {llm.device}{compiled}) in "
          f"{time.perf_counter() - started:.1f}s")
    return llm


def cmd_generate(args) -> int:
    params = _sampling(args)  # validate before the (slow) load
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _load(args)
    llm.compile_constraint(params)  # a schema the grammar engine cannot take fails here, before generating
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        ids = llm.chat_prompt(messages)
    else:
        ids = llm.encode(prompt)
    if args.stream:
        for piece in llm.stream(ids, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        out = llm.last_output
        sys.stdout.write("\n")
    else:
        out = llm.generate([ids], params, use_tqdm=False)[0]
        print(out.text)
    m = out.metrics
    speed = f", {m['decode_tokens_per_s']:.1f} tok/s decode" if m.get("decode_tokens_per_s") else ""
    if m.get("drafted"):
        speed += (f", {m['target_passes']} target passes, {m['accepted']}/{m['drafted']} drafted tokens accepted, "
                  f"{m['mean_accepted_tokens']:.2f} tokens/pass")
    if m.get("forced_tokens"):
        speed += f", {m['forced_tokens']} tokens forced by the grammar (jump-forward)"
    _info(f"{m['output_tokens']} tokens ({out.finish_reason}), prompt {m['prompt_tokens']} tokens, "
          f"ttft {m['ttft_s'] * 1000:.0f} ms{speed}")
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _load(args)
    llm.compile_constraint(params)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    _info("chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits")
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        try:
            pieces = []
            for piece in llm.stream_chat(messages, params):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:  # stop this answer, keep the session
            print(" [interrupted]")
        except LeapLMError as e:  # e.g. the conversation outgrew the context window: keep the session
            print(f"\nerror: {e} (use /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(pieces)})


def cmd_models(args) -> int:
    from . import hub

    if args.action == "fetch":
        names = args.names or [hub.DEFAULT_MODEL]
        for name in names:
            path = hub.fetch(name, progress=True)
            print(f"ok   {name}: {path}")
        return 0
    print(f"known models (stored in {hub.models_dir()}):")
    for model, path in hub.list_models():
        where = str(path) if path else f"not downloaded (leaplm models fetch {model.name})"
        print(f"  {model.name:<30} {model.params:>5}  {model.description}\n  {'':<30} {'':>5}  {where}")
    return 0


def cmd_profile(args) -> int:
    from .bench.roofline import format_roofline, roofline

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    llm = _load(args)
    if args.verify_curve:
        import json

        from .bench.verify_curve import format_verify_curve, plot_verify_curve, verify_curve

        _info(f"timing verification passes of 0..64 draft nodes after a {args.context}-token context")
        curve = verify_curve(llm.model, context=args.context)
        curve["model"] = llm.model_path.name
        curve["quantization"] = llm.model.quantization
        print(format_verify_curve(curve))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "verify_curve.json").write_text(json.dumps(curve, indent=2))
            plot_verify_curve(curve, out / "verify_curve.png", title=f"{llm.model_path.name}"
                              f"{' ' + llm.model.quantization if llm.model.quantization else ''}: verification cost vs nodes")
            _info(f"wrote {out / 'verify_curve.json'} and {out / 'verify_curve.png'}")
        return 0
    _info("measuring memory bandwidth and profiling greedy decode (about a minute)")
    print(format_roofline(llm.model_path.name, roofline(llm.model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leaplm", description="Fast and faithful LLM text generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt (or chat turn with --chat)")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_model_args(g)
    _add_sampling_args(g)
    _add_structured_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat")
    c.add_argument("--system", default=None, help="system message")
    _add_model_args(c)
    _add_sampling_args(c)
    _add_structured_args(c)
    c.set_defaults(func=cmd_chat, temperature=0.0)

    m = sub.add_parser("models", help="list known models, or `models fetch NAME` to download one")
    m.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    m.add_argument("names", nargs="*")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("profile", help="decode speed vs the memory-bandwidth ceiling, and where the time goes")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    pr.add_argument("--verify-curve", action="store_true",
                    help="instead: time one verification pass vs the number of draft tree nodes (0..64)")
    pr.add_argument("--context", type=int, default=512, help="context length for --verify-curve (default 512)")
    pr.add_argument("--out", default=None, help="with --verify-curve: folder for verify_curve.json and .png")
    _add_model_args(pr)
    pr.set_defaults(func=cmd_profile)

    try:
        from .bench.cli import add_parser as add_bench
    except ImportError:  # pragma: no cover - bench extras missing
        add_bench = None
    if add_bench is not None:
        add_bench(sub)

    from .evals.cli import add_parser as add_eval

    add_eval(sub)
    return parser


def _info(msg: str) -> None:
    print(f"[leaplm] {msg}", file=sys.stderr)


class _status:
    """A spinner on stderr while something slow happens (only on a terminal)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ctx = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console

            self.ctx = Console(stderr=True).status(self.text)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("LEAPLM_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["LEAPLM_THREADS"]))
    try:
        return int(args.func(args) or 0)
    except LeapLMError as e:
        if os.environ.get("LEAPLM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
