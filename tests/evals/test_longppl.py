"""``leaplm eval longppl``: one stream past the context, scored under StreamingLLM (every token) and with the full
cache in windows of the context (the in-context figure); the stream is built from the texts' ids."""
from __future__ import annotations

import json
import math

import pytest

from leaplm import cli
from leaplm.evals.longppl import stream_ids, summarize
from leaplm.tokenizer import Tokenizer
from tests.test_cli import leaplm

TEXT = "The quick brown fox jumps over the lazy dog while counting 1, 2, 3 and then some more.\n" * 40


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("longppl") / "text.txt"
    path.write_text(TEXT)
    return path


def test_longppl_end_to_end(tiny_dir, text_file, tmp_path):
    out = leaplm("eval", "longppl", "--model", str(tiny_dir), "--text", str(text_file), "--tokens", "1200",
                 "--segment", "400", "-q", "none", "--policy", "none", "--policy", "streaming_llm:window=100,evict=16",
                 "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["eval"] == "longppl" and r["settings"]["tokens"] == 1200 and r["settings"]["context"] == 512
    full, stream = r["modes"]["full"], r["modes"]["streaming_llm:window=100,evict=16"]
    assert stream["tokens"] == 1199 and len(stream["by_segment"]) == 3
    assert full["tokens"] == 1199 - 2   # windows of 511 tokens: each window's first token is not scored
    for m in (full, stream):
        assert m["perplexity"] == pytest.approx(math.exp(m["nll_per_token"])) and m["perplexity"] > 1
    assert stream["kv_cache_bytes"] < full["kv_cache_bytes"]


def test_stream_ids_and_summary(tiny_dir, text_file):
    tok = Tokenizer.from_path(tiny_dir)
    ids = stream_ids(tok, str(text_file), 300)
    from leaplm.evals.perplexity import load_texts

    assert len(ids) == 300 and ids == load_texts(tok, str(text_file)).ids[0][:300]
    s = summarize([-1.0, -1.0, -3.0], segment=2)
    assert s["tokens"] == 3 and s["perplexity"] == pytest.approx(math.exp(5 / 3))
    assert s["by_segment"] == pytest.approx([math.e, math.exp(3)])


def test_bad_input(capsys, text_file):
    assert cli.main(["eval", "longppl", "--tokens", "1"]) == 2
    assert "--tokens must be >= 2" in capsys.readouterr().err
    assert cli.main(["eval", "longppl", "--policy", "h2oo"]) == 2
    assert "unknown kv_policy" in capsys.readouterr().err
