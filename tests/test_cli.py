"""The leaplm command: generation end to end, and one-line errors with exit status 2 (no traceback)."""
from __future__ import annotations

import subprocess
import sys

import pytest


def leaplm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leaplm.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=600)


@pytest.mark.real
def test_generate_greedy_and_stream_agree(smollm_gguf):
    args = ["generate", "--model", str(smollm_gguf), "--max-tokens", "12", "The capital of France is"]
    plain, streamed = leaplm(*args), leaplm(*args, "--stream")
    assert plain.returncode == 0, plain.stderr
    assert streamed.returncode == 0, streamed.stderr
    assert plain.stdout.strip() and plain.stdout.strip() == streamed.stdout.strip()
    assert "tok/s" in plain.stderr and "Traceback" not in plain.stderr


@pytest.mark.real
def test_chat_flag_uses_the_template(smollm_gguf):
    out = leaplm("generate", "--model", str(smollm_gguf), "--chat", "--max-tokens", "16", "What is 2+2?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.real
def test_interactive_chat_reads_turns_until_eof(smollm_gguf):
    out = leaplm("chat", "--model", str(smollm_gguf), "--max-tokens", "8", stdin="Hello!\n/reset\nBye!\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 3


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model.gguf", "hi"], "/no/such/model.gguf"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--top-p", "1.5", "hi"], "top_p"),
    (["generate", "--max-tokens", "0", "hi"], "max_tokens"),
    (["generate", "--spec", "draft", "hi"], "--draft-model"),
    (["generate", "--spec", "prompt_lookup", "--draft-model", "x", "hi"], "only used by --spec draft"),
    (["generate", "--spec", "prompt_lookup", "--num-draft", "0", "hi"], "num_draft"),
    (["generate", "--spec", "rasd", "--corpus", "x", "hi"], "--spec rasd needs --draft-model"),
    (["generate", "--spec", "rasd", "--draft-model", "x", "hi"], "--spec rasd needs --corpus"),
    (["generate", "--quantization", "int3", "hi"], "unknown quantization"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    out = leaplm(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:")


def test_rasd_takes_the_draft_model_and_the_corpus():
    from argparse import Namespace

    from leaplm.cli import _speculative

    args = Namespace(spec="rasd", draft_model="d.gguf", corpus="src/", tree=3, num_draft=12)
    assert _speculative(args) == {"method": "rasd", "model": "d.gguf", "corpus": "src/", "tree_top_k": 3,
                                  "num_draft": 12}


def test_corrupt_file_message(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    out = leaplm("generate", "--model", str(bad), "hi")
    assert out.returncode == 2 and "broken.gguf" in out.stderr and "Traceback" not in out.stderr


def test_models_lists_known_names():
    out = leaplm("models")
    assert out.returncode == 0, out.stderr
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        assert name in out.stdout


def test_generate_with_a_draft_model_and_int8(smollm_gguf):
    """The model drafting for itself (int8 draft, int8 target): same text as plain int8 decoding."""
    plain = leaplm("generate", "--model", str(smollm_gguf), "-q", "int8", "--max-tokens", "24", "--chat", "Name three colors.")
    spec = leaplm("generate", "--model", str(smollm_gguf), "-q", "int8", "--draft-model", str(smollm_gguf),
                  "--max-tokens", "24", "--chat", "Name three colors.")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and spec.stdout.strip()
    assert "drafted tokens accepted" in spec.stderr
