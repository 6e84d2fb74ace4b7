"""Peer adapters without their engines: llama.cpp through a fake ``llama_cpp`` module, peer parsing."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from leaplm.bench import BenchError
from leaplm.bench.peers import LlamaCppPeer, load_peers, parse_peers
from leaplm.sampling import SamplingParams


class FakeLlama:
    """Yields a fixed continuation; records the calls the peer makes."""

    instances: list = []

    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose):
        self.kwargs = dict(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose)
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
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    FakeLlama.instances.clear()
    return module


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


def test_hf_load_failure_is_a_status(tmp_path):
    empty_folder = types.SimpleNamespace(model_path=tmp_path, eos_token_ids=[2], dtype=None, device="cpu")
    [entry] = load_peers(["hf"], empty_folder, threads=1)
    assert entry.status.startswith("failed: ") and entry.peer is None


def test_parse_peers():
    assert parse_peers("hf, llamacpp,hf") == ["hf", "llamacpp"]
    assert parse_peers(None) == []
    with pytest.raises(BenchError, match="known peers: hf, llamacpp"):
        parse_peers("vllm")
