"""Peer adapters: llama.cpp through a fake ``llama_cpp`` module, the transformers peers (``hf``, ``hf_pld``,
``hf_assisted``) on tiny random models, peer parsing."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from leaplm.bench import BenchError, peers
from leaplm.bench.peers import KNOWN_PEERS, LlamaCppPeer, LlamaCppPromptLookupPeer, load_peers, parse_peers
from leaplm.sampling import SamplingParams


class FakeLlama:
    """Yields a fixed continuation; records the calls the peer makes."""

    instances: list = []

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose, draft_model=None, logits_all=False):
        self.kwargs = dict(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose,
                           draft_model=draft_model, logits_all=logits_all)
        self.calls: list = []
        self.resets = 0
        FakeLlama.instances.append(self)

    def reset(self):
        self.resets += 1

    def set_seed(self, seed):
        self.calls.append(("seed", seed))

    def generate(self, tokens, **kwargs):
        self.calls.append(("generate", list(tokens), kwargs))
        yield from [10, 11, 2, 12, 13]  # 2 = EOS

    def close(self):
        pass


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    module.__version__ = "0.0-fake"
    module.__spec__ = types.SimpleNamespace(name="llama_cpp")
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = FakePromptLookup
    module.llama_speculative = speculative
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    monkeypatch.setattr(peers, "llamacpp_extra_buffers_work", lambda path: True)
    FakeLlama.instances.clear()
    return module


class FakePromptLookup:
    def __init__(self, max_ngram_size=2, num_pred_tokens=10):
        self.max_ngram_size, self.num_pred_tokens = max_ngram_size, num_pred_tokens


def _target(path: Path, eos=(2,)):
    return types.SimpleNamespace(model_path=path, eos_token_ids=list(eos),
                                 engine=types.SimpleNamespace(max_model_len=8192))


def test_llamacpp_peer_feeds_ids_stops_at_eos_and_resets(fake_llama_cpp, tmp_path):
    peer = LlamaCppPeer(_target(tmp_path / "m.gguf"), threads=3)
    llm = FakeLlama.instances[0]
    assert llm.kwargs["n_ctx"] == 4096 and llm.kwargs["n_threads"] == 3 and llm.kwargs["verbose"] is False
    gen = peer.generate([1, 5, 6], SamplingParams(temperature=0, max_tokens=10))
    assert gen.token_ids == [10, 11, 2] and gen.finish_reason == "stop" and gen.ttft_s is not None
    _, fed, kwargs = llm.calls[-1]
    assert fed == [1, 5, 6] and kwargs["temp"] == 0.0 and kwargs["top_k"] == 1 and llm.resets == 1
    gen = peer.generate([1, 5, 6], SamplingParams(temperature=0, max_tokens=2))
    assert gen.token_ids == [10, 11] and gen.finish_reason == "length" and llm.resets == 2
    gen = peer.generate([1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert gen.token_ids == [10, 11, 2, 12, 13]  # the fake ran dry: no EOS stop with ignore_eos
    with pytest.raises(BenchError, match="n_ctx"):
        peer.generate(list(range(5000)), SamplingParams(temperature=0))


def test_llamacpp_status(fake_llama_cpp, tmp_path):
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    [entry] = load_peers(["llamacpp"], _target(folder), threads=1)
    assert entry.status == "skipped: needs a GGUF file" and entry.peer is None
    [entry] = load_peers(["llamacpp"], _target(tmp_path / "m.gguf"), threads=1)
    assert entry.status == "ok" and entry.info["version"] == "0.0-fake"


def test_llamacpp_not_installed(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    [entry] = load_peers(["llamacpp"], _target(tmp_path / "m.gguf"), threads=1)
    assert entry.status == "skipped: not installed" and "pip install llama-cpp-python" in entry.info["hint"]


def test_llamacpp_pld_passes_the_prompt_lookup_drafter(fake_llama_cpp, tmp_path):
    peer = LlamaCppPromptLookupPeer(_target(tmp_path / "m.gguf"), threads=2)
    llm = FakeLlama.instances[0]
    draft = llm.kwargs["draft_model"]
    assert isinstance(draft, FakePromptLookup) and draft.num_pred_tokens == 10 and draft.max_ngram_size == 2
    assert llm.kwargs["logits_all"] is True   # else llama-cpp-python's score buffer overflows past n_batch tokens
    assert peer.info["num_pred_tokens"] == 10 and peer.info["draft_model"] == "LlamaPromptLookupDecoding"
    gen = peer.generate([1, 5, 6], SamplingParams(temperature=0, max_tokens=10))
    assert gen.token_ids == [10, 11, 2] and gen.finish_reason == "stop"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    entries = load_peers(["llamacpp", "llamacpp_pld"], _target(tmp_path / "m.gguf"), threads=1)
    assert [e.status for e in entries] == ["ok", "ok"]
    plain, pld = FakeLlama.instances[-2:]
    assert plain.kwargs["draft_model"] is None and isinstance(pld.kwargs["draft_model"], FakePromptLookup)


def test_llamacpp_pld_not_installed(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    [entry] = load_peers(["llamacpp_pld"], _target(tmp_path / "m.gguf"), threads=1)
    assert entry.status == "skipped: not installed" and entry.peer is None


def test_hf_load_failure_is_a_status(tmp_path):
    empty_folder = types.SimpleNamespace(model_path=tmp_path, eos_token_ids=[2], dtype=None, device="cpu")
    [entry] = load_peers(["hf"], empty_folder, threads=1)
    assert entry.status.startswith("failed: ") and entry.peer is None


def test_parse_peers():
    assert parse_peers("hf, llamacpp,hf") == ["hf", "llamacpp"]
    assert parse_peers("hf_pld,hf_assisted,llamacpp_pld") == ["hf_pld", "hf_assisted", "llamacpp_pld"]
    assert parse_peers(None) == []
    with pytest.raises(BenchError, match="known peers: " + ", ".join(KNOWN_PEERS)):
        parse_peers("vllm")


# --------------------------------------------------------------------------- transformers peers, tiny models

# The last prompt repeats itself, so prompt lookup has matches to draft from.
HF_PROMPTS = [[1, 5, 9, 33, 70, 12], [1, 100, 3, 44], [1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]


def _hf_target(folder: Path, draft: Path | None = None, eos=(2,)):
    import torch

    return types.SimpleNamespace(model_path=folder, draft_model_path=draft, eos_token_ids=list(eos), pad_token_id=0,
                                 dtype=torch.float32, device=torch.device("cpu"),
                                 engine=types.SimpleNamespace(max_model_len=256))


@pytest.fixture(scope="module")
def hf_folders(tiny_model_dir):
    """A tiny target and a different tiny draft with the same vocabulary (128), both HF folders."""
    target, _ = tiny_model_dir("llama-gqa-untied")
    draft, _ = tiny_model_dir("llama-mha-tied")
    return target, draft


def _outputs(peer, params):
    return [peer.generate(ids, params) for ids in HF_PROMPTS]


def test_hf_pld_and_assisted_match_hf_greedy(hf_folders):
    folder, draft = hf_folders
    entries = load_peers(["hf", "hf_pld", "hf_assisted"], _hf_target(folder, draft), threads=1)
    assert [e.status for e in entries] == ["ok", "ok", "ok"], [e.status for e in entries]
    hf, pld, assisted = (e.peer for e in entries)
    # one model for the three peers; the draft is a separate model
    assert pld.model is hf.model and assisted.model is hf.model and assisted.draft is not hf.model
    assert pld.info["shared_weights"] and assisted.info["shared_weights"] and "shared_weights" not in hf.info
    assert pld.info["prompt_lookup_num_tokens"] == 10
    assert assisted.info["num_assistant_tokens"] == 20 and assisted.info["num_assistant_tokens_schedule"] == "constant"
    assert assisted.info["draft_model"] == str(draft)

    # target passes: prompt lookup must actually accept drafts on the repetitive prompt
    passes = {"n": 0}
    hook = hf.model.register_forward_pre_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    try:
        ref = _outputs(hf, params)
        passes["n"] = 0
        got = pld.generate(HF_PROMPTS[-1], params)
        assert passes["n"] < 16, "prompt lookup accepted no draft token"
    finally:
        hook.remove()
    assert all(len(g.token_ids) == 16 and g.finish_reason == "length" for g in ref)
    assert got.token_ids == ref[-1].token_ids
    for peer in (pld, assisted):
        out = _outputs(peer, params)
        assert [g.token_ids for g in out] == [g.token_ids for g in ref], peer.name
        assert all(g.ttft_s is not None and g.ttft_s > 0 for g in out)

    # several EOS ids: each output's 5th token becomes an extra EOS -> all stop there, reason "stop"
    extra = sorted({g.token_ids[4] for g in ref})
    for peer in (hf, pld, assisted):
        peer.target = _hf_target(folder, draft, eos=[2, *extra])
    with_eos = {p.name: _outputs(p, SamplingParams(temperature=0, max_tokens=16)) for p in (hf, pld, assisted)}
    for i, g in enumerate(with_eos["hf"]):
        cut = next(j for j, t in enumerate(ref[i].token_ids) if t in extra or t == 2)
        assert g.token_ids == ref[i].token_ids[:cut + 1] and g.finish_reason == "stop"
    for name in ("hf_pld", "hf_assisted"):
        assert [g.token_ids for g in with_eos[name]] == [g.token_ids for g in with_eos["hf"]], name
        assert all(g.finish_reason == "stop" for g in with_eos[name])
    short = assisted.generate(HF_PROMPTS[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert short.token_ids == ref[0].token_ids[:3] and short.finish_reason == "length"
    for e in entries:
        e.peer.close()


def test_hf_pld_alone_loads_its_own_model(hf_folders):
    folder, _ = hf_folders
    [entry] = load_peers(["hf_pld"], _hf_target(folder), threads=1)
    assert entry.status == "ok" and "shared_weights" not in entry.info


def test_hf_assisted_needs_a_draft(hf_folders):
    folder, _ = hf_folders
    [hf, assisted] = load_peers(["hf", "hf_assisted"], _hf_target(folder, draft=None), threads=1)
    assert hf.status == "ok"
    assert assisted.status == "skipped: needs --draft-model" and assisted.peer is None


def test_hf_assisted_draft_with_other_vocab_fails_clearly(hf_folders, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder, _ = hf_folders
    other = tmp_path / "draft-256"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 num_key_value_heads=2)).save_pretrained(other)
    [entry] = load_peers(["hf_assisted"], _hf_target(folder, other), threads=1)
    assert entry.status.startswith("failed: BenchError: draft vocab_size 256 != target's 128"), entry.status


_real_probe = peers.llamacpp_extra_buffers_work


def test_a_crashing_llamacpp_build_is_loaded_without_extra_buffer_types(fake_llama_cpp, monkeypatch, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(peers, "llamacpp_extra_buffers_work", _real_probe)
    monkeypatch.setattr(peers, "_probed", {})
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=-11))
    assert peers.llamacpp_extra_buffers_work(tmp_path / "m.gguf") is False
    assert peers.llamacpp_extra_buffers_work(tmp_path / "m.gguf") is False and len(calls) == 1   # probed once
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(returncode=0))
    assert peers.llamacpp_extra_buffers_work(tmp_path / "other.gguf") is True

    # the peer then builds Llama with model params whose use_extra_bufts is off, and restores the default
    params_module = types.SimpleNamespace(llama_model_default_params=lambda: types.SimpleNamespace(use_extra_bufts=True))
    llama_module = types.ModuleType("llama_cpp.llama")
    llama_module.llama_cpp = params_module
    monkeypatch.setitem(sys.modules, "llama_cpp.llama", llama_module)
    monkeypatch.setattr(fake_llama_cpp, "llama", llama_module, raising=False)
    seen = []
    monkeypatch.setattr(FakeLlama, "__init__", lambda self, **kw: seen.append(
        params_module.llama_model_default_params().use_extra_bufts) or FakeLlama.instances.append(self))
    monkeypatch.setattr(peers, "_probed", {str(tmp_path / "m.gguf"): False})
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    [entry] = load_peers(["llamacpp"], _target(tmp_path / "m.gguf"), threads=1)
    assert entry.status == "ok", entry.status
    assert seen == [False] and entry.info["extra_buffer_types"] is False and "crashed" in entry.info["note"]
    assert params_module.llama_model_default_params().use_extra_bufts is True
