"""``leaplm eval longctx``: the generated tasks (sized in the model's tokens, facts at the asked depth, the same
prompts from the same seed), RULER's scoring, and the command end to end (results.json, the plot, one-line errors);
on the real SmolLM2, the full cache finds the pass key and SnapKV holds a quarter of the KV."""
from __future__ import annotations

import json

import pytest

from leaplm import cli
from leaplm.evals.longctx import TASKS, make_sample, score
from leaplm.tokenizer import Tokenizer
from tests.test_cli import leaplm


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_path(tiny_dir)


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_their_length_and_hold_their_facts(task, tokenizer):
    for length in (800, 1600):
        for i in range(3):
            s = make_sample(tokenizer, task, length, i, 3, seed=1)
            assert 0.9 * length <= len(s.prompt_ids) <= length
            assert all(a in s.context for a in s.answers)
            assert s.depth == pytest.approx((i + 0.5) / 3)
            first = min(s.context.index(a) for a in s.answers)
            if task in ("passkey", "niah_single"):   # the one fact sits where asked
                assert abs(first / len(s.context) - s.depth) < 0.15
            again = make_sample(tokenizer, task, length, i, 3, seed=1)
            assert again.prompt_ids == s.prompt_ids
    assert make_sample(tokenizer, task, 800, 0, 3, seed=2).prompt_ids != make_sample(tokenizer, task, 800, 0, 3,
                                                                                      seed=1).prompt_ids


def test_variable_chain_reads_in_order(tokenizer):
    s = make_sample(tokenizer, "vt", 600, 1, 2)
    spots = [s.context.index(f"VAR {name} =") for name in s.answers]
    assert spots == sorted(spots)


def test_score_is_string_match_all():
    assert score(" 123 and 456.", ["123", "456"]) == 1.0
    assert score(" The answer: 123", ["123", "456"]) == 0.5
    assert score("abcde", ["ABC"]) == 1.0 and score("", ["1"]) == 0.0


def test_longctx_end_to_end(tiny_dir, tmp_path):
    out = leaplm("eval", "longctx", "--model", str(tiny_dir), "--tasks", "passkey,niah_single", "--lengths", "480",
                 "--samples", "2", "--policy", "none", "--policy", "snapkv:budget=64,window=8",
                 "--policy", "streaming_llm:window=80,evict=16", "-q", "none", "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "KV vs full" in out.stdout and "snapkv:budget=64,window=8" in out.stdout
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["eval"] == "longctx" and r["settings"]["lengths"] == [480] and len(r["runs"]) == 2 * 2 * 3
    full, snap, stream = (r["modes"][k] for k in ("full", "snapkv:budget=64,window=8", "streaming_llm:window=80,evict=16"))
    assert full["kv_vs_full"] == 1.0 and snap["kv_vs_full"] < 0.5 and stream["kv_vs_full"] < 0.5
    assert snap["kv_cache_bytes"] > snap["kv_final_bytes"]   # held the prompt, then the compressed copy
    assert stream["kv_cache_bytes"] < full["kv_cache_bytes"]   # never held the prompt
    for run in r["runs"]:
        assert 0 <= run["score"] <= 1 and run["answers"] and run["prompt_tokens"] <= 480
    assert (tmp_path / "accuracy_vs_kv.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--tasks", "passkey,nope"], "unknown nope"),
    (["--lengths", "100"], ">= 256"),
    (["--lengths", "4k"], "comma-separated token counts"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--policy", "h2oo"], "unknown kv_policy 'h2oo'"),
    (["--policy", "snapkv:ratio=2"], "ratio"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert cli.main(["eval", "longctx", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


@pytest.mark.real
def test_smollm2_finds_the_pass_key(smollm_gguf, tmp_path):
    out = leaplm("eval", "longctx", "--model", str(smollm_gguf), "--tasks", "passkey", "--lengths", "1024",
                 "--samples", "2", "--policy", "none", "--policy", "snapkv:ratio=0.25", "--out", str(tmp_path),
                 "--no-progress")
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["modes"]["full"]["accuracy"] == 1.0
    assert r["modes"]["snapkv:ratio=0.25"]["kv_vs_full"] < 0.3
