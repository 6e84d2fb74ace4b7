"""The ``leaplm`` command: generate | chat | models | profile | bench | eval.

Errors a user can cause (bad path, corrupt file, bad flag values, prompt too long) print one
``error: ...`` line and exit with status 2 — no traceback — and every check that does not need the
model runs before it is loaded (a load takes tens of seconds): flag values, ``--device``, the prompt,
the structured-output constraint, ``--draft-model`` / ``--corpus`` paths, output folders.
``LEAPLM_DEBUG=1`` shows tracebacks.

``generate`` exits with status 1, after printing the text, when a structured-output request
(``--json-schema``, ``--regex``, ``--grammar``, ``--json-object``) was cut at the token limit before
its grammar could end: the text is a prefix that does not parse. A warning on stderr says so.
"""
from __future__ import annotations

import argparse
import os
import string
import sys
import time
from pathlib import Path

# check_device: re-exported while a committed leaplm/bench/cli.py may still import it from here (drop it then)
from .cli_common import (add_model_args, at_least, check_device, check_model_args, parse_size,  # noqa: F401
                         prepare_out_dir, speculative_spec)
from .cli_common import info as _info
from .errors import InvalidParamsError, LeapLMError

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
ESCAPES_HELP = r'Backslash escapes \n \t \r \\ \" \' \xNN \uNNNN \UNNNNNNNN are interpreted (any other backslash is kept)'


def unescape(text: str, flag: str = "--stop") -> str:
    r"""``text`` with the backslash escapes of ``ESCAPES_HELP`` replaced by the characters they stand for,
    as a user types them in a shell (``--stop "\n\n"`` is two newlines). A backslash before any other
    character, or at the end, is kept; every other character — non-ASCII text included — is unchanged.
    Raises ``InvalidParamsError`` naming ``flag`` for ``\x`` / ``\u`` / ``\U`` without their 2 / 4 / 8 hex
    digits, or a code point that is a surrogate or past U+10FFFF."""
    out, i = [], 0
    while i < len(text):
        c, nxt = text[i], text[i + 1: i + 2]
        if c == "\\" and nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif c == "\\" and nxt in _HEX_DIGITS:
            n = _HEX_DIGITS[nxt]
            digits = text[i + 2: i + 2 + n]
            if len(digits) != n or any(d not in string.hexdigits for d in digits):
                raise InvalidParamsError(f"{flag} {text}: \\{nxt} needs {n} hex digits, got {digits!r}")
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise InvalidParamsError(f"{flag} {text}: \\{nxt}{digits} is not a Unicode character")
            out.append(chr(code))
            i += 2 + n
        else:
            out.append(c)
            i += 1
    return "".join(out)


def version() -> str:
    """leaplm's installed version (package metadata), else ``leaplm.__version__``."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("leaplm")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _threads_from_env() -> None:
    """``LEAPLM_THREADS=N``: torch threads; anything but an integer >= 1 is an error."""
    value = os.environ.get("LEAPLM_THREADS", "").strip()
    if not value:
        return
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidParamsError(f"LEAPLM_THREADS must be an integer >= 1, got {value!r}")
    import torch

    torch.set_num_threads(n)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=0.0,
                   help="0 = greedy (default); otherwise at least 1e-5: sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the likeliest tokens up to this total probability, in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K likeliest tokens (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P times the likeliest one, in [0, 1] (default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (default 1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted from the logit of every token already generated (default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted once per earlier occurrence of a token in the output (default 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="makes sampling reproducible: the same seed gives the same tokens; 0 .. 2**64 - 1")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help=f"stop before this string (repeatable). {ESCAPES_HELP}: --stop '\\n\\n' stops at a blank line")


def _add_structured_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("structured output (at most one; see docs/structured-output.md)",
                             "Give enough --max-tokens: output cut at the limit does not parse (a warning says so, "
                             "and generate exits with status 1).")
    s.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is one JSON instance of the JSON Schema in FILE")
    s.add_argument("--regex", metavar="R", default=None, help="the whole output matches regular expression R")
    s.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output follows the Lark (llguidance dialect) or GBNF grammar in FILE")
    s.add_argument("--json-object", action="store_true", help="the output is a JSON object")


def _read_text(flag: str, path: str) -> str:
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
    """The flags' ``SamplingParams``, every check that needs no model done (the constraint's syntax included)."""
    from .sampling import SamplingParams

    stops = [unescape(s) for s in args.stop or []]
    if "" in stops:
        raise InvalidParamsError("--stop '': an empty stop string would stop nothing")
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens, stop=stops or None,
        **_structured(args),
    )
    if params.constraint is not None:
        from .constrain import check_constraint

        check_constraint(**params.constraint)
    return params


def _prompt(args) -> str:
    """The PROMPT argument, else stdin (with a hint on a terminal). Empty is an error; whitespace is a prompt."""
    if args.prompt is not None:
        prompt = args.prompt
    else:
        if sys.stdin.isatty():
            _info("reading the prompt from stdin (end with Ctrl-D)")
        prompt = sys.stdin.read()
    if prompt == "":
        raise InvalidParamsError("the prompt is empty: give it as an argument or on stdin")
    return prompt


def _uses_native_ops(args) -> bool:
    """Whether loading this model builds leaplm's C++ ops: CPU with int8 / int4 weights (``auto`` on a low-bit
    GGUF file included) or ``--compile``. False where that is not known yet (a model still to download)."""
    import torch

    from . import hub
    from .llm import parse_dtype
    from .quant import resolve_quantization

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cpu":
        return False
    if getattr(args, "compile", False):
        return True
    try:
        path = hub.resolve(args.model or hub.DEFAULT_MODEL, download=False)
        mode = resolve_quantization(getattr(args, "quantization", None), path, device, parse_dtype(args.dtype, device))
    except LeapLMError:   # not downloaded yet, or unreadable: the load says what is wrong
        return False
    return mode in ("int8", "int4")


def _build_native_ops(args) -> None:
    """Build leaplm's C++ ops before the load, with a spinner, when this machine has not built them yet and the
    load needs them (it would build them anyway, about a minute, once; ``leaplm.native.load`` prints a line
    saying so)."""
    from . import native

    if not native.needs_build() or not _uses_native_ops(args):
        return
    with _status("compiling native ops (first run only, about a minute)"):
        native.load()


def _load(args):
    from .llm import LLM

    _build_native_ops(args)
    started = time.perf_counter()
    compiling = " and compiling its decode step (up to a few minutes the first time)" if getattr(args, "compile", False) else ""
    with _status(f"loading {args.model or 'smollm2-135m-instruct'}{compiling}"):
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  speculative=speculative_spec(args), quantization=getattr(args, "quantization", None),
                  compile=getattr(args, "compile", False), max_num_seqs=getattr(args, "max_num_seqs", None),
                  kv_cache_memory=parse_size("--kv-cache-memory", getattr(args, "kv_cache_memory", None)),
                  reserve_kv_memory=getattr(args, "reserve_kv_memory", False),
                  kv_policy=getattr(args, "kv_policy", None))
    weights = f", {llm.quantization} weights" if llm.quantization else ""
    compiled = f", compiled in {llm.compile_s:.1f}s" if llm.compile_s is not None else ""
    _info(f"loaded {llm.model_path.name} ({llm.config.family}, {llm.dtype}{weights}, {llm.device}{compiled}) in "
          f"{time.perf_counter() - started:.1f}s")
    if getattr(args, "reserve_kv_memory", False):
        engine = llm.engine
        _info(f"reserved a KV pool of {engine.kv_cache_memory / 2 ** 30:.2f} GiB ({engine.capacity_tokens} tokens; "
              "--kv-cache-memory sets its size, --no-reserve-kv-memory lets it grow with use)")
    return llm


_INCOMPLETE = {"json_schema": "is not a complete JSON instance of the schema (it does not parse)",
               "json_object": "is not a complete JSON object (it does not parse)",
               "regex": "does not match the regex", "grammar": "does not complete the grammar"}


def unfinished_constraint(llm, params, out) -> str | None:
    """Why ``out`` does not satisfy ``params``' structured-output request — it was cut at the token limit
    (finish reason ``length``) where its grammar cannot end — or None when it does, or when there is none."""
    if params.constraint is None or out.finish_reason != "length":
        return None
    cursor = llm.compile_constraint(params).new()
    cursor.advance(out.token_ids)
    if cursor.can_stop():
        return None
    limit = (f"--max-tokens {params.max_tokens}" if len(out.token_ids) >= params.max_tokens
             else "the end of the context window")
    return (f"the output was cut at {limit} (finish reason length) and {_INCOMPLETE[next(iter(params.constraint))]}; "
            "give a larger --max-tokens")


def cmd_generate(args) -> int:
    if args.system is not None and not args.chat:
        raise InvalidParamsError("--system needs --chat (the system message goes into the chat template)")
    params = _sampling(args)  # validate before the (slow) load
    check_model_args(args)
    prompt = _prompt(args)
    llm = _load(args)
    llm.compile_constraint(params)  # a schema the grammar engine cannot take fails here, before generating
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
                   [{"role": "user", "content": prompt}]
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
    unfinished = unfinished_constraint(llm, params, out)
    if unfinished:
        _info(f"warning: {unfinished}")
        return 1
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    check_model_args(args)
    llm = _load(args)
    llm.compile_constraint(params)
    first = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(first)
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
            messages = list(first)
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
        else:
            unfinished = unfinished_constraint(llm, params, llm.last_output)
            if unfinished:
                _info(f"warning: {unfinished}")
        messages.append({"role": "assistant", "content": "".join(pieces)})


def cmd_models(args) -> int:
    from . import hub
    from .errors import ModelNotFoundError

    if args.action == "fetch":
        names = args.names or [hub.DEFAULT_MODEL]
        for name in names:
            path = hub.fetch(name, progress=True)
            print(f"ok   {name}: {path}")
        return 0
    unknown = [n for n in args.names if n not in hub.KNOWN_MODELS]
    if unknown:
        raise ModelNotFoundError(f"unknown model name {unknown[0]!r}; known: {', '.join(hub.KNOWN_MODELS)}")
    print(f"known models (stored in {hub.models_dir()}):")
    for model, path in hub.list_models():
        if args.names and model.name not in args.names:
            continue
        where = str(path) if path else f"not downloaded (leaplm models fetch {model.name})"
        print(f"  {model.name:<30} {model.params:>5}  {model.description}\n  {'':<30} {'':>5}  {where}")
    return 0


def cmd_profile(args) -> int:
    from .bench.roofline import format_roofline, roofline

    if args.out is not None and not args.verify_curve:
        raise InvalidParamsError("--out is only used with --verify-curve")
    at_least("--threads", args.threads, 1)
    at_least("--context", args.context, 1)
    check_model_args(args)
    out = prepare_out_dir(args.out) if args.out is not None else None
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
        if out is not None:
            (out / "verify_curve.json").write_text(json.dumps(curve, indent=2))
            plot_verify_curve(curve, out / "verify_curve.png", title=f"{llm.model_path.name}"
                              f"{' ' + llm.model.quantization if llm.model.quantization else ''}: verification cost vs nodes")
            _info(f"wrote {out / 'verify_curve.json'} and {out / 'verify_curve.png'}")
        return 0
    _info("measuring memory bandwidth and profiling greedy decode (about a minute)")
    print(format_roofline(llm.model_path.name, roofline(llm.model)))
    return 0


def served_model_name(args) -> str:
    """The name a server answers to: ``--served-model-name``, else the ``--model`` name (a file or folder: its name
    without ``.gguf``), else the default model's name."""
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return "smollm2-135m-instruct"
    p = Path(args.model)
    return p.name[: -len(".gguf")] if p.name.endswith(".gguf") else (p.name or args.model)


def cmd_serve(args) -> int:
    check_model_args(args)
    at_least("--port", args.port, 0)
    if args.port > 65535:
        raise InvalidParamsError(f"--port must be <= 65535, got {args.port}")
    at_least("--max-queue", args.max_queue, 0)
    if not args.shutdown_timeout >= 0:
        raise InvalidParamsError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    at_least("--default-max-tokens", args.default_max_tokens, 1)
    body = parse_size("--max-body-size", args.max_body_size)
    key = args.api_key if args.api_key is not None else os.environ.get("LEAPLM_API_KEY") or None
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    try:
        from .serve import launch
    except ImportError as e:  # pragma: no cover - installed with leaplm
        raise InvalidParamsError(f"leaplm serve needs fastapi and uvicorn ({e}); pip install 'fastapi' 'uvicorn'") from None
    llm = _load(args)
    spec = speculative_spec(args)
    config = launch.ServeConfig(served_model_name=served_model_name(args), api_key=key,
                                speculative=spec["method"] if spec else None, max_queue=args.max_queue,
                                max_body_bytes=body, allowed_origins=origins,
                                default_max_tokens=args.default_max_tokens)
    code = launch.run(llm, config, host=args.host, port=args.port, log_level=args.log_level,
                      graceful_s=args.shutdown_timeout)
    if code != 0:
        print(f"error: the server did not start on {args.host}:{args.port} (see above: a port in use? pick another "
              "with --port)", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leaplm", description="Fast and faithful LLM text generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt (or chat turn with --chat)",
                       description="Complete PROMPT; the text goes to stdout, load time and speed to stderr. "
                                   "Exit status: 0 done, 1 structured output cut at the token limit, 2 bad input.")
    g.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: read stdin); empty is an error, whitespace is a prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (needs --chat)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_model_args(g)
    _add_sampling_args(g)
    _add_structured_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat")
    c.add_argument("--system", default=None, help="system message")
    add_model_args(c)
    _add_sampling_args(c)
    _add_structured_args(c)
    c.set_defaults(func=cmd_chat, temperature=0.0)

    m = sub.add_parser("models", help="list known models (all, or the NAMEs given), or `models fetch NAME` to download one")
    m.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    m.add_argument("names", nargs="*", metavar="NAME", help="known model names (list: only these; fetch: default smollm2-135m-instruct)")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("profile", help="decode speed vs the memory-bandwidth ceiling, and where the time goes")
    pr.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    pr.add_argument("--verify-curve", action="store_true",
                    help="instead: time one verification pass vs the number of draft tree nodes (0..64)")
    pr.add_argument("--context", type=int, default=512, help="context length for --verify-curve (default 512)")
    pr.add_argument("--out", default=None,
                    help="with --verify-curve: folder for verify_curve.json and .png (created and checked first)")
    add_model_args(pr)
    pr.set_defaults(func=cmd_profile)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat page at /)",
                        description="Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, "
                                    "/v1/models), Prometheus /metrics and a chat page at /. Prints one line when ready. "
                                    "See docs/serving.md.")
    add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $LEAPLM_API_KEY, else no key)")
    sv.add_argument("--served-model-name", default=None,
                    help="the model name clients send and /v1/models lists (default: the --model name or file name)")
    sv.add_argument("--allowed-origins", default=None,
                    help="comma-separated origins allowed by CORS, e.g. http://localhost:3000 (default: none)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting beyond the --max-num-seqs running ones before answering 429 (default 256)")
    sv.add_argument("--max-body-size", default="4MiB", metavar="SIZE", help="request body cap, answered 413 (default 4MiB)")
    sv.add_argument("--default-max-tokens", type=int, default=None,
                    help="max_tokens when a request gives none (default: the rest of the context window)")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="on SIGTERM/Ctrl-C, how long in-flight requests may run on before they are aborted (default 30)")
    sv.add_argument("--reserve-kv-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="make the whole KV pool (--kv-cache-memory) resident at start, as vLLM and llama.cpp's server "
                         "do: memory stays constant under load and too little memory fails at start (default: on; "
                         "--no-reserve-kv-memory: the pool's memory grows with the blocks in use)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default warning)")
    sv.set_defaults(func=cmd_serve)

    try:
        from .bench.cli import add_parser as add_bench
    except ImportError:  # pragma: no cover - bench extras missing
        add_bench = None
    if add_bench is not None:
        add_bench(sub)
        from .bench.serve_load_cli import add_parser as add_bench_serve

        add_bench_serve(sub)

    from .evals.cli import add_parser as add_eval

    add_eval(sub)
    from .train.cli import add_parser as add_train

    add_train(sub)
    return parser


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = ["leaplm"] + argv   # the command as given, for reports (bench, eval results.json)
    try:
        _threads_from_env()
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
