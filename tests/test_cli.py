"""The leaplm command, run in-process (``leaplm.cli.main``): one-line errors with exit status 2 (no traceback),
found before the model loads wherever the model is not needed; ``--stop`` escapes; the README's own command
lines; structured output cut at the token limit (warning, exit 1); ``--chat`` applying the chat template; and
generation end to end on the real SmolLM2 (one load per module: ``shared_llm``)."""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from leaplm import cli, cli_common
from leaplm.errors import InvalidParamsError

from .structured_helpers import build_tiny_llm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


class _Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def leaplm(*args: str, stdin: str = "", tty: bool = False) -> SimpleNamespace:
    """Run ``leaplm ARGS`` in this process -> ``.returncode``, ``.stdout``, ``.stderr``. An exception that the
    CLI lets escape (a traceback for a user) fails the calling test; ``LEAPLM_DEBUG`` is ignored."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdin, debug = sys.stdin, os.environ.pop("LEAPLM_DEBUG", None)
    sys.stdin = _Stdin(stdin, tty)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:   # argparse: --help, --version, a malformed command line
                code = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = saved_stdin
        if debug is not None:
            os.environ["LEAPLM_DEBUG"] = debug
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load (LLM, build_model, the bench runner) fails the test: the check must come before it."""
    import leaplm.bench.runner
    import leaplm.llm
    import leaplm.models.load

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded: this check must come before the load")

    monkeypatch.setattr(leaplm.llm, "LLM", refuse)   # the CLI imports it at the load
    monkeypatch.setattr(leaplm.models.load, "build_model", refuse)
    monkeypatch.setattr(leaplm.bench.runner, "run_bench", refuse)


@pytest.fixture(scope="module")
def shared_llm():
    """CLI runs with the same LLM(...) arguments share one loaded model (a load takes ~35 s on 2 cores);
    ``.last`` is the LLM the latest CLI run used. Everything the CLI does besides building the LLM still runs."""
    import leaplm.llm

    real, cache, shared = leaplm.llm.LLM, {}, SimpleNamespace(last=None)

    def cached(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        shared.last = cache[key]
        return shared.last

    patch = pytest.MonkeyPatch()
    patch.setattr(leaplm.llm, "LLM", cached)
    yield shared
    patch.undo()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("cli-tiny"), tiny_tokenizer())


def one_error_line(out, message: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.startswith("error:") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- --stop escapes


@pytest.mark.parametrize("typed, meant", [
    (r"\n\n", "\n\n"),
    (r"a\tb\rc", "a\tb\rc"),
    (r"\\n", "\\n"),                       # an escaped backslash, then a plain n
    (r"\"q\'", "\"q'"),
    (r"\x41\u00e9\U0001F600", "A\u00e9\U0001F600"),
    ("caf\u00e9\\n", "caf\u00e9\n"),       # non-ASCII text stays as typed (unicode_escape would mangle it)
    ("\u2603 \u65e5\u672c", "\u2603 \u65e5\u672c"),
    (r"\d+\.", r"\d+\."),                  # other escapes are kept with their backslash
    ("end\\", "end\\"),
    ("plain", "plain"),
])
def test_stop_escapes(typed, meant):
    assert cli.unescape(typed) == meant


@pytest.mark.parametrize("typed, message", [
    (r"\x4", r"\x needs 2 hex digits"), (r"\xZZ", r"\x needs 2 hex digits"), (r"\u12", r"\u needs 4 hex digits"),
    (r"\ud800", "is not a Unicode character"), (r"\U00110000", "is not a Unicode character"),
])
def test_bad_stop_escapes(typed, message):
    with pytest.raises(InvalidParamsError, match=re.escape(message)):
        cli.unescape(typed)


def readme_commands() -> list[list[str]]:
    """Every ``leaplm ...`` line of the README's bash blocks, split as a shell would (comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()
            if line.startswith("leaplm ")]


def test_readme_command_lines_parse_and_pass_the_checks_before_the_load(no_model_load):
    """Each README command parses; each `generate` line's flags also pass every check made before the load
    (a --json-schema file it names is not in the repository, so its sampling check is skipped)."""
    commands = readme_commands()
    assert len(commands) >= 15, commands
    parser = cli.build_parser()
    stops = []
    for argv in commands:
        args = parser.parse_args(argv[1:])
        if argv[1] == "generate":
            cli_common.check_model_args(args)
            if args.json_schema is None:
                stops += cli._sampling(args).stop
    assert "\n\n" in stops   # the --stop example means a blank line


# --------------------------------------------------------------------------- errors before the load


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model.gguf", "hi"], "/no/such/model.gguf"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--temperature", "1e-45", "hi"], "temperature=1e-45"),
    (["generate", "--top-p", "1.5", "hi"], "top_p"),
    (["generate", "--max-tokens", "0", "hi"], "max_tokens"),
    (["generate", "--seed", str(2 ** 64), "hi"], "seed=18446744073709551616"),
    (["generate", "--seed", "-1", "hi"], "seed=-1"),
    (["generate", "--device", "tpu", "hi"], "--device: unknown device 'tpu'"),
    (["generate", "--device", "mps", "hi"], "--device: device 'mps' is not supported"),
    (["generate", "--max-model-len", "0", "hi"], "--max-model-len must be >= 2, got 0"),
    (["generate", "--max-model-len", "-5", "hi"], "--max-model-len must be >= 2, got -5"),
    (["generate", "--system", "be brief", "hi"], "--system needs --chat"),
    (["generate", "--stop", r"\x4", "hi"], r"--stop \x4: \x needs 2 hex digits, got '4'"),
    (["generate", "--stop", "", "hi"], "empty stop string"),
    (["generate", "--spec", "draft", "hi"], "--draft-model"),
    (["generate", "--spec", "prompt_lookup", "--draft-model", "x", "hi"], "only used by --spec draft"),
    (["generate", "--spec", "prompt_lookup", "--num-draft", "0", "hi"], "--num-draft must be >= 1, got 0"),
    (["generate", "--draft-model", "/no/such/draft.gguf", "--num-draft", "0", "hi"], "--num-draft must be >= 1"),
    (["generate", "--num-draft", "3", "hi"], "--num-draft needs --spec"),
    (["generate", "--typical-acceptance", "hi"], "--typical-acceptance needs --spec medusa"),
    (["generate", "--spec", "eagle", "--draft-head", "x", "--typical-acceptance", "hi"],
     "--typical-acceptance is only used by --spec medusa, not --spec eagle"),
    (["eval", "humaneval", "--samples", "2"], "--samples must be >= 1, and 1 when greedy"),
    (["eval", "humaneval", "--temperature", "0.7", "--top-p", "0"], "--top-p in (0, 1], got 0.7 and 0.0"),
    (["generate", "--spec", "rasd", "--corpus", "x", "hi"], "--spec rasd needs --draft-model"),
    (["generate", "--spec", "rasd", "--draft-model", "x", "hi"], "--spec rasd needs --corpus"),
    (["generate", "--draft-model", "/no/such/draft.gguf", "hi"], "--draft-model: model path '/no/such/draft.gguf'"),
    (["generate", "--draft-model", "no-such-model", "hi"], "not a known model name"),
    (["generate", "--spec", "retrieval", "--corpus", "/no/such/corpus", "hi"], "--corpus: '/no/such/corpus' does not exist"),
    (["generate", "--quantization", "int3", "hi"], "unknown quantization"),
    (["generate", "--kv-cache-memory", "lots", "hi"], "--kv-cache-memory: 'lots' is not a size"),
    (["generate", "--kv-cache-memory", "0", "hi"], "--kv-cache-memory: '0' is not a size"),
    (["generate", "--max-num-seqs", "0", "hi"], "--max-num-seqs must be >= 1, got 0"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "--regex", "[a-", "hi"], "invalid regex for structured output"),
    (["chat", "--device", "tpu"], "--device: unknown device"),
    (["chat", "--seed", "-1"], "seed=-1"),
    (["models", "list", "no-such-model"], "unknown model name 'no-such-model'"),
    (["profile", "--out", "x"], "--out is only used with --verify-curve"),
    (["profile", "--threads", "0"], "--threads must be >= 1"),
    (["profile", "--device", "tpu"], "--device: unknown device"),
    (["eval", "perplexity", "--device", "tpu"], "--device: unknown device"),
    (["bench", "--workload", "builtin", "--device", "tpu", "--out", "o"], "--device: unknown device"),
    (["serve", "--port", "70000"], "--port must be <= 65535"),
    (["serve", "--max-body-size", "big"], "--max-body-size: 'big' is not a size"),
    (["serve", "--max-queue", "-1"], "--max-queue must be >= 0"),
    (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    (["serve", "--default-max-tokens", "0"], "--default-max-tokens must be >= 1"),
    (["serve", "--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
])
def test_bad_input_is_one_line_exit_2_before_the_load(args, message, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a relative --out stays in the test's folder
    one_error_line(leaplm(*args), message)


def test_cuda_on_a_cpu_only_torch(no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_error_line(leaplm("generate", "--device", "cuda", "hi"), "--device: device 'cuda'")


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_leaplm_threads(value, monkeypatch, no_model_load):
    monkeypatch.setenv("LEAPLM_THREADS", value)
    one_error_line(leaplm("generate", "hi"), f"LEAPLM_THREADS must be an integer >= 1, got {value!r}")


def test_bad_constraints_fail_before_the_load(tmp_path, no_model_load):
    """Grammar syntax and unsupported schema keywords are found without the model (llguidance checks them
    without a tokenizer); the message is the one the compile after the load would give."""
    unique = tmp_path / "unique.json"
    unique.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    one_error_line(leaplm("generate", "--json-schema", str(unique), "hi"), "uniqueItems")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{'type': 'object'}")
    one_error_line(leaplm("generate", "--json-schema", str(not_json), "hi"), "is not valid JSON")
    grammar = tmp_path / "bad.lark"
    grammar.write_text("start: nowhere\n")
    one_error_line(leaplm("generate", "--grammar", str(grammar), "hi"), 'unknown name: "nowhere"')
    gbnf = tmp_path / "bad.gbnf"
    gbnf.write_text("root ::= missing\n")   # neither Lark nor valid GBNF
    out = leaplm("generate", "--grammar", str(gbnf), "hi")
    one_error_line(out, "invalid grammar for structured output: not valid Lark, and not convertible from GBNF: "
                        "Rule 'missing' not found")
    assert out.stderr.count("invalid grammar") == 1


def test_empty_stdin_is_an_error_and_a_terminal_gets_a_hint(no_model_load):
    piped = leaplm("generate", stdin="")
    one_error_line(piped, "the prompt is empty")
    assert "reading the prompt from stdin" not in piped.stderr
    typed = leaplm("generate", stdin="", tty=True)
    assert typed.returncode == 2
    assert typed.stderr.splitlines() == ["[leaplm] reading the prompt from stdin (end with Ctrl-D)",
                                         piped.stderr.strip()]


def test_whitespace_prompt_is_a_prompt(tiny_dir):
    for args, stdin in ((["   "], ""), ([], "\n")):
        out = leaplm("generate", "--model", str(tiny_dir), "--max-tokens", "3", *args, stdin=stdin)
        assert out.returncode == 0, out.stderr
        assert re.search(r"3 tokens \(length\), prompt [1-9]\d* tokens", out.stderr), out.stderr


@pytest.mark.parametrize("command", [
    ["profile", "--verify-curve"],
    ["bench", "--workload", "builtin"],
    ["eval", "perplexity"],
    ["eval", "humaneval"],
])
def test_out_folder_that_cannot_be_made_fails_before_the_work(command, tmp_path, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "out"     # a folder inside a file: mkdir fails, even for root
    one_error_line(leaplm(*command, "--out", str(bad)), f"--out '{bad}': cannot create the folder")


def test_prepare_out_dir_makes_nested_folders(tmp_path):
    out = cli_common.prepare_out_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("flags, builds", [([], False), (["-q", "int8"], True), (["-q", "int4"], True),
                                           (["--compile"], True), (["--device", "cpu", "-q", "none"], False)])
def test_native_ops_are_built_before_the_load_only_when_it_needs_them(flags, builds, tiny_dir, monkeypatch):
    """On a first run (nothing built yet) the ops are built up front, under their own status line, when the
    load would build them: int8 / int4 weights or --compile on CPU (the tiny model is a float safetensors folder)."""
    from leaplm import native

    calls = []
    monkeypatch.setattr(native, "needs_build", lambda: True)
    monkeypatch.setattr(native, "load", lambda *a, **k: calls.append(1) or True)
    args = cli.build_parser().parse_args(["generate", "--model", str(tiny_dir), *flags, "hi"])
    cli._build_native_ops(args)
    assert calls == ([1] if builds else [])


@pytest.mark.real
def test_default_model_builds_native_ops_first(smollm_gguf, monkeypatch):
    """The default model is a low-bit GGUF file: `auto` loads it as int8, which needs the ops."""
    from leaplm import native

    calls = []
    monkeypatch.setattr(native, "needs_build", lambda: True)
    monkeypatch.setattr(native, "load", lambda *a, **k: calls.append(1) or True)
    cli._build_native_ops(cli.build_parser().parse_args(["generate", "hi"]))
    assert calls == [1]


def test_rasd_takes_the_draft_model_and_the_corpus():
    from argparse import Namespace

    args = Namespace(spec="rasd", draft_model="d.gguf", corpus="src/", tree=3, num_draft=12)
    assert cli_common.speculative_spec(args) == {"method": "rasd", "model": "d.gguf", "corpus": "src/",
                                                 "tree_top_k": 3, "num_draft": 12}


def test_corrupt_file_message(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    one_error_line(leaplm("generate", "--model", str(bad), "hi"), "broken.gguf")


# --------------------------------------------------------------------------- --version, help, models


def test_version():
    out = leaplm("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"leaplm {importlib.metadata.version('leaplm')}"


@pytest.mark.parametrize("command", ["generate", "chat", "profile", "serve"])
def test_every_flag_has_help(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    missing = [a.option_strings for a in sub._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == []


def test_stop_help_names_the_escapes():
    out = leaplm("generate", "--help")
    assert out.returncode == 0
    assert re.search(r"--stop STR\s+stop before this string", out.stdout) and r"\uNNNN" in out.stdout


def test_models_lists_known_names():
    out = leaplm("models")
    assert out.returncode == 0, out.stderr
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        assert name in out.stdout


def test_models_list_names_lists_only_those():
    out = leaplm("models", "list", "gemma-3-270m")
    assert out.returncode == 0, out.stderr
    assert "gemma-3-270m" in out.stdout and "smollm2-135m-instruct" not in out.stdout


# --------------------------------------------------------------------------- structured output cut short


def test_structured_output_cut_at_max_tokens_warns_and_exits_1(tiny_dir, tmp_path):
    schema = tmp_path / "name.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
    out = leaplm("generate", "--model", str(tiny_dir), "--json-schema", str(schema), "--max-tokens", "3", "hi")
    assert out.returncode == 1, out.stderr
    assert "(length)" in out.stderr
    assert ("warning: the output was cut at --max-tokens 3 (finish reason length) and is not a complete JSON "
            "instance of the schema") in out.stderr
    assert out.stdout.startswith('{"') and not out.stdout.rstrip().endswith("}")
    with pytest.raises(ValueError):
        json.loads(out.stdout)


def test_output_cut_where_the_grammar_may_end_is_fine(tiny_dir):
    """A regex that the cut output already matches: finish reason length, but nothing is broken."""
    out = leaplm("generate", "--model", str(tiny_dir), "--regex", "[0-9]+", "--max-tokens", "3", "hi")
    assert out.returncode == 0, out.stderr
    assert "3 tokens (length)" in out.stderr and "warning" not in out.stderr
    assert re.fullmatch(r"[0-9]+", out.stdout.strip()), out.stdout


# --------------------------------------------------------------------------- the real model


@pytest.mark.real
def test_readme_stop_example_stops_at_a_blank_line(smollm_gguf, shared_llm):
    """The README's --stop line, run as written (the default model is the SmolLM2 file) with --max-tokens 64:
    it stops where the same seeded run without --stop writes its first blank line."""
    line = next(argv for argv in readme_commands() if "--stop" in argv)
    stopped = leaplm(*line[1:], "--max-tokens", "64")
    i = line.index("--stop")
    free = leaplm(*line[1:i], *line[i + 2:], "--max-tokens", "64")
    assert stopped.returncode == free.returncode == 0, stopped.stderr + free.stderr
    text, free_text = stopped.stdout[:-1], free.stdout[:-1]   # print() adds one newline
    assert "\n\n" in free_text, f"the README example's prompt/seed no longer writes a blank line: {free_text!r}"
    assert "(stop)" in stopped.stderr and "\n\n" not in text
    assert text == free_text.split("\n\n")[0]


@pytest.mark.real
def test_json_schema_cut_short_on_smollm2(smollm_gguf, shared_llm, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                                  "required": ["name", "age"]}))
    out = leaplm("generate", "--chat", "--json-schema", str(schema), "--max-tokens", "4", "Invent a person")
    assert out.returncode == 1, out.stderr
    assert "warning: the output was cut at --max-tokens 4 (finish reason length)" in out.stderr
    with pytest.raises(ValueError):
        json.loads(out.stdout)


@pytest.mark.real
def test_chat_flag_applies_the_chat_template(smollm_gguf, shared_llm):
    """--chat sends the chat-templated prompt (its token count is reported) and answers as LLM.chat does;
    --system goes into the template too."""
    from leaplm import SamplingParams

    question = "What is 2+2?"
    out = leaplm("generate", "--chat", "--max-tokens", "16", question)
    assert out.returncode == 0, out.stderr
    llm = shared_llm.last
    messages = [{"role": "user", "content": question}]
    templated = llm.chat_prompt(messages)
    assert len(templated) > len(llm.encode(question)) + 5
    assert f"prompt {len(templated)} tokens" in out.stderr
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].text
    assert out.stdout == expected + "\n" and expected.strip()

    system = leaplm("generate", "--chat", "--system", "Answer in French.", "--max-tokens", "4", question)
    assert system.returncode == 0, system.stderr
    with_system = llm.chat_prompt([{"role": "system", "content": "Answer in French."}, *messages])
    assert f"prompt {len(with_system)} tokens" in system.stderr


@pytest.mark.real
def test_generate_greedy_and_stream_agree(smollm_gguf, shared_llm):
    args = ["generate", "--max-tokens", "12", "The capital of France is"]
    plain, streamed = leaplm(*args), leaplm(*args, "--stream")
    assert plain.returncode == 0, plain.stderr
    assert streamed.returncode == 0, streamed.stderr
    assert plain.stdout.strip() and plain.stdout == streamed.stdout
    assert "tok/s" in plain.stderr


@pytest.mark.real
def test_interactive_chat_reads_turns_until_eof(smollm_gguf, shared_llm):
    out = leaplm("chat", "--max-tokens", "8", stdin="Hello!\n/reset\nBye!\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 4   # two answered turns, /reset, and the prompt that met EOF


@pytest.mark.real
@pytest.mark.slow
def test_generate_with_a_draft_model_and_int8(smollm_gguf, shared_llm):
    """The model drafting for itself (int8 draft, int8 target): same text as plain int8 decoding."""
    plain = leaplm("generate", "--model", str(smollm_gguf), "-q", "int8", "--max-tokens", "24", "--chat", "Name three colors.")
    spec = leaplm("generate", "--model", str(smollm_gguf), "-q", "int8", "--draft-model", str(smollm_gguf),
                  "--max-tokens", "24", "--chat", "Name three colors.")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.strip()
    assert "drafted tokens accepted" in spec.stderr
