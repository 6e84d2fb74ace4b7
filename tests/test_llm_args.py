"""LLM's arguments are checked before anything is resolved, downloaded or loaded (device, dtype, sizes,
quantization), and a broken checkpoint is named by its real cause, not as a tokenizer failure."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from leaplm import LLM, hub
from leaplm.errors import CorruptModelError, InvalidParamsError, ModelNotFoundError
from leaplm.llm import parse_device, parse_dtype


@pytest.fixture
def no_resolve(monkeypatch):
    """Fail the test if LLM gets as far as resolving (or downloading) the model."""
    def resolve(*a, **k):
        raise AssertionError("the model was resolved before the arguments were checked")

    monkeypatch.setattr(hub, "resolve", resolve)


def test_devices_leaplm_runs_on_are_accepted():
    assert parse_device("cpu") == torch.device("cpu") and parse_device(torch.device("cpu")) == torch.device("cpu")
    assert parse_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device, message", [
    ("tpu", r"unknown device 'tpu'; leaplm runs on: cpu, cuda, cuda:N"),
    ("cuda:x", r"unknown device 'cuda:x'"), ("CPU", "unknown device 'CPU'"),
    ("mps", r"device 'mps' is not supported; leaplm runs on: cpu, cuda, cuda:N"),
    ("meta", "device 'meta' is not supported"), (3, "device must be a string .* not int"),
])
def test_unknown_or_unsupported_devices_are_refused_before_the_load(device, message, no_resolve):
    with pytest.raises(InvalidParamsError, match=message):
        parse_device(device)
    with pytest.raises(InvalidParamsError, match=message):
        LLM("nowhere/not-a-model", device=device)


def test_cuda_on_a_torch_without_cuda_is_refused(monkeypatch, no_resolve):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(InvalidParamsError, match=r"device 'cuda': this torch build \(.*\) has no CUDA support; "
                                                 r"install a CUDA build of torch or use device='cpu'"):
        LLM(device="cuda")


def test_cuda_without_a_visible_gpu_is_refused(monkeypatch, no_resolve):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidParamsError, match=r"device 'cuda:0': torch sees no CUDA GPU"):
        LLM(device="cuda:0")


def test_a_gpu_index_the_machine_lacks_is_refused(monkeypatch, no_resolve):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse_device("cuda:0") == torch.device("cuda:0") and parse_device("cuda") == torch.device("cuda")
    with pytest.raises(InvalidParamsError, match=r"device 'cuda:7' does not exist: this machine has 1 CUDA GPU "
                                                 r"\(cuda:0 to cuda:0\)"):
        LLM(device="cuda:7")


@pytest.mark.parametrize("dtype, message", [
    ("float64", "unknown dtype 'float64'; choose one of: auto, bf16"), (torch.int8, "torch.int8 is not a float type"),
    (torch.float64, "torch.float64 is not a float type"), (32, "unknown dtype 32"),
])
def test_bad_dtypes_are_refused(dtype, message, no_resolve):
    with pytest.raises(InvalidParamsError, match=message):
        parse_dtype(dtype, torch.device("cpu"))
    with pytest.raises(InvalidParamsError, match=message):
        LLM(dtype=dtype, device="cpu")


def test_good_dtypes_parse():
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) == parse_dtype("auto", cpu) == torch.float32
    assert parse_dtype("bf16", cpu) == parse_dtype(torch.bfloat16, cpu) == torch.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_model_len=0), r"max_model_len must be None \(the model's context window\) or an integer >= 1, got 0"),
    (dict(max_model_len=-5), "max_model_len .* got -5"), (dict(max_model_len=True), "max_model_len .* got True"),
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1, got 0"),
    (dict(max_batch_size=2.5), "max_batch_size .* got 2.5"),
    (dict(quantization="int3"), "unknown quantization 'int3'"),
])
def test_bad_sizes_and_quantization_are_refused_before_the_load(kwargs, message, no_resolve):
    with pytest.raises(InvalidParamsError, match=message):
        LLM(device="cpu", **kwargs)


def _tiny_folder_with_a_tokenizer(tmp_path, tiny_model_dir):
    """A tiny llama folder that also holds a (word-level) tokenizer, so LLM gets past the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, _ = tiny_model_dir("llama-gqa-untied")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="t1",
                            eos_token="t2").save_pretrained(tmp_path)
    return tmp_path


def test_a_bad_config_json_is_named_not_reported_as_a_tokenizer_failure(tmp_path, tiny_model_dir):
    folder = _tiny_folder_with_a_tokenizer(tmp_path, tiny_model_dir)
    llm = LLM(str(folder), device="cpu", quantization=None)   # the folder is good as built
    assert llm.generate([[1, 5, 9]], _greedy(3))[0].token_ids
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match=r"config\.json is not valid JSON: Expecting property name"):
        LLM(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps(["llama"]))
    with pytest.raises(CorruptModelError, match=r"config\.json holds a JSON list"):
        LLM(str(folder), device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        LLM(str(folder), device="cpu")


def _greedy(n):
    from leaplm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n)
