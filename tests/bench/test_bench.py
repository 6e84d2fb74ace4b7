"""``leaplm bench`` end to end on a tiny random llama (token-id workload, no tokenizer), offline and fast."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from leaplm.bench import BenchError, cli
from leaplm.bench.methods import Generation, METHODS, parse_methods, register_method, vanilla
from leaplm.bench.runner import first_divergence

METHOD_KEYS = {"tokens_per_s", "speedup_vs_vanilla", "mean_accepted_tokens", "ttft_s", "peak_rss_mb",
               "exact_match_vs_vanilla", "first_divergence", "lossy", "not_exact", "status", "per_category"}
CATEGORY_KEYS = {"tokens_per_s", "speedup_vs_vanilla", "mean_accepted_tokens", "ttft_s", "exact_match_vs_vanilla"}
PROMPTS = [([1, 5, 9, 33, 70, 12], "alpha"), ([1, 100, 3, 44], "alpha"), ([1, 7, 7, 7, 8, 120, 64, 30, 2, 11], "beta")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """A tiny random llama folder (no tokenizer files) and a 3-prompt token-id workload."""
    folder, _ = tiny_model_dir("llama-gqa-untied")
    workload = tmp_path_factory.mktemp("bench-workload") / "ids.jsonl"
    workload.write_text("".join(json.dumps({"id": f"p{i}", "category": cat, "prompt_ids": ids}) + "\n"
                                for i, (ids, cat) in enumerate(PROMPTS)))
    return folder, workload


@pytest.fixture(scope="module")
def perturb_method():
    """A test-only method that claims losslessness but changes one token of vanilla's output."""
    def perturb(target, prompt_ids, params, at: int = 3):
        gen = vanilla(target, prompt_ids, params)
        ids = list(gen.token_ids)
        if len(ids) > at:
            ids[at] = (ids[at] + 1) % target.model.config.vocab_size
        return Generation(ids, gen.ttft_s, gen.target_passes, gen.finish_reason)

    saved = METHODS.get("perturb")
    register_method("perturb", perturb, lossless=True, description="test only: wrong on purpose")
    yield "perturb"
    if saved is None:
        METHODS.pop("perturb", None)
    else:
        METHODS["perturb"] = saved


@pytest.fixture(scope="module")
def run(tiny, perturb_method, tmp_path_factory):
    folder, workload = tiny
    out = tmp_path_factory.mktemp("bench-out")
    code = cli.run(["--model", str(folder), "--workload", str(workload), "--max-tokens", "12",
                    "--methods", f"{perturb_method}:at=2", "--peers", "hf,llamacpp", "--threads", "1",
                    "--warmup", "1", "--no-progress", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def _finite_numbers(obj, path="results"):
    if isinstance(obj, float):
        assert math.isfinite(obj), path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_numbers(v, f"{path}[{i}]")


def test_json_contract(run):
    code, out, res = run
    for key in ("machine", "command", "workload", "limit", "max_tokens", "methods", "peers", "date", "not_exact"):
        assert key in res, key
    for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "leaplm", "git_commit"):
        assert key in res["machine"], key
    assert res["command"][:2] == ["leaplm", "bench"] and "--peers" in res["command"]
    assert res["workload"]["n_samples"] == 3 and res["workload"]["categories"] == {"alpha": 2, "beta": 1}
    assert res["max_tokens"] == 12 and res["limit"] is None
    assert list(res["methods"]) == ["vanilla", "perturb:at=2"] and list(res["peers"]) == ["hf", "llamacpp"]
    for label, s in {**res["methods"], **res["peers"]}.items():
        assert METHOD_KEYS <= set(s), (label, METHOD_KEYS - set(s))
        if s["status"] == "ok":
            assert len(s["first_divergence"]) == 3 and set(s["per_category"]) == {"alpha", "beta"}
            for cat in s["per_category"].values():
                assert CATEGORY_KEYS <= set(cat)
            assert s["tokens_per_s"] > 0 and s["ttft_s"] > 0 and s["peak_rss_mb"] > 0
    _finite_numbers(res)


def test_vanilla_is_the_exact_reference(run):
    _, _, res = run
    v = res["methods"]["vanilla"]
    assert v["speedup_vs_vanilla"] == pytest.approx(1.0)
    assert v["exact_match_vs_vanilla"] == 1.0 and v["first_divergence"] == [None, None, None]
    assert v["mean_accepted_tokens"] == pytest.approx(1.0) and v["lossy"] is False and not v["not_exact"]
    for cat in v["per_category"].values():
        assert cat["speedup_vs_vanilla"] == pytest.approx(1.0)


def test_hf_peer_matches_vanilla(run):
    _, _, res = run
    hf = res["peers"]["hf"]
    assert hf["status"] == "ok", hf["status"]
    assert hf["exact_match_vs_vanilla"] == 1.0, hf["first_divergence"]
    assert hf["mean_accepted_tokens"] is None and hf["speedup_vs_vanilla"] > 0


def test_llamacpp_reported_as_skipped(run):
    _, out, res = run
    lc = res["peers"]["llamacpp"]
    if importlib.util.find_spec("llama_cpp") is not None:
        assert lc["status"].startswith("skipped: needs a GGUF file")  # the tiny model is an HF folder
    else:
        assert lc["status"] == "skipped: not installed"
    assert lc["tokens_per_s"] is None
    assert "llamacpp" in (out / "report.md").read_text()


def test_wrong_method_is_caught_as_not_exact(run):
    code, out, res = run
    p = res["methods"]["perturb:at=2"]
    assert p["exact_match_vs_vanilla"] < 1.0 and p["not_exact"] is True
    assert 2 in p["first_divergence"]
    assert res["not_exact"] == ["perturb:at=2"] and code == 1
    report = (out / "report.md").read_text()
    assert "NOT EXACT" in report and "perturb:at=2" in report


def test_report_and_plots_written(run):
    _, out, _ = run
    report = (out / "report.md").read_text()
    assert "| method |" in report and "## Speed-up by category" in report and "vanilla" in report
    for name in ("speedup_by_category.png", "tokens_per_s_per_sample.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert {x["label"] for x in lines} == {"vanilla", "perturb:at=2", "hf"}


def test_first_divergence_rules():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2            # stopped early without reason
    assert first_divergence([1, 2, 3], [1, 2], out_cut=True) is None  # its context window ended it
    assert first_divergence([1, 2, 3], []) == 0


def test_method_parsing_errors():
    assert [m.label for m in parse_methods(None)] == ["vanilla"]
    assert [m.label for m in parse_methods("vanilla")] == ["vanilla"]
    with pytest.raises(BenchError, match="known methods: .*vanilla"):
        parse_methods("nonsense")
    with pytest.raises(BenchError, match="has no knob"):
        parse_methods("vanilla:k=3")
    with pytest.raises(BenchError, match="bad knob"):
        parse_methods("vanilla:k")


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    folder, workload = tiny
    assert cli.run(["--model", str(folder), "--workload", str(workload), "--methods", "nope",
                    "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.run(["--model", str(folder), "--workload", str(workload), "--peers", "vllm",
                    "--out", str(tmp_path)]) == 2
    assert "unknown peer 'vllm'" in capsys.readouterr().err
    # a text workload on a model without tokenizer: a clear error, not a traceback
    assert cli.run(["--model", str(folder), "--workload", "builtin", "--out", str(tmp_path)]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_add_parser_registers_bench():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["bench", "--workload", "builtin", "--out", "x", "--methods", "vanilla",
                              "--peers", "hf,llamacpp", "--limit", "2"])
    assert args.func is cli.main and args.limit == 2 and args.warmup == 1 and args.temperature == 0.0


def test_sampling_run_and_failures_are_reported_not_fatal(tiny, tmp_path):
    """T > 0 is not flagged NOT EXACT; a bad prompt (id outside the vocabulary) is a per-sample error."""
    folder, workload = tiny
    bad = tmp_path / "ids.jsonl"
    bad.write_text(workload.read_text() + json.dumps({"id": "oov", "category": "beta", "prompt_ids": [1, 999]}) + "\n")
    out = tmp_path / "out"
    code = cli.run(["--model", str(folder), "--workload", str(bad), "--max-tokens", "6", "--temperature", "0.9",
                    "--peers", "hf", "--threads", "1", "--warmup", "0", "--no-progress", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert code == 0 and res["greedy"] is False and res["not_exact"] == []
    for s in (res["methods"]["vanilla"], res["peers"]["hf"]):
        assert s["n_samples"] == 4 and s["n_failed"] == 1 and s["n_ok"] == 3
        assert s["errors"][0]["id"] == "oov" and "outside the vocabulary" in s["errors"][0]["error"]
        assert s["per_category"]["beta"]["n_ok"] == 1
    assert res["methods"]["vanilla"]["exact_match_vs_vanilla"] == 1.0
    _finite_numbers(res)
    report = (out / "report.md").read_text()
    assert "sample oov" in report and "temperature 0.9" in report


def test_each_methods_entry_learns_on_its_own_drafter(tiny):
    """Two entries that spell one configuration (``recycling`` and ``recycling:lookup=first``) must not share
    a drafter: the second would run every sample after the first had already learnt it."""
    from leaplm.bench.methods import load_target
    from leaplm.sampling import SamplingParams

    folder, _ = tiny
    target = load_target(folder, need_tokenizer=False)
    first, second = parse_methods("recycling,recycling:lookup=first")[1:]
    params = SamplingParams(temperature=0, max_tokens=8)
    for run in (first, second):
        run(target, PROMPTS[2][0], params)
    drafters = [v for k, v in target.cache.items() if "recycling" in k]
    assert len(drafters) == 2 and drafters[0] is not drafters[1]
    assert {k[0] for k in target.cache} == {"recycling", "recycling:lookup=first"}


def test_draft_entries_share_one_loaded_draft_model(tiny):
    """``draft`` entries whose draft keeps its whole LM head share the loaded draft weights (one copy in memory
    however many ``draft:*`` entries a run has); each still has its own drafter; a shrunk head loads its own."""
    from leaplm.bench.methods import load_target, vanilla
    from leaplm.sampling import SamplingParams

    folder, _ = tiny
    target = load_target(folder, need_tokenizer=False, draft_model_path=folder)
    params = SamplingParams(temperature=0, max_tokens=10)
    want = vanilla(target, PROMPTS[2][0], params).token_ids
    runs = parse_methods("draft,draft:staged=false,draft:draft_vocab=64")[1:]
    for run in runs:
        assert run(target, PROMPTS[2][0], params).token_ids == want
    drafters = [v for k, v in target.cache.items() if "draft" in k[1:]]
    assert len(drafters) == 3 and len({id(d) for d in drafters}) == 3
    whole, unstaged, shrunk = drafters
    assert whole.model is unstaged.model and shrunk.model is not whole.model
    assert whole.model is not target.model and shrunk.vocab_map is not None and whole.vocab_map is None
