"""Loading: real GGUF equals transformers' GGUF load; bad checkpoints give precise errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from leaplm.models.load import build_model, load_checkpoint


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_truncated_gguf_is_reported_as_corrupt(tmp_path, smollm_gguf):
    bad = tmp_path / "cut.gguf"
    with open(smollm_gguf, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(CorruptModelError, match="cut.gguf"):
        load_checkpoint(bad)


def test_random_bytes_gguf_is_corrupt(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 3)
    with pytest.raises(CorruptModelError, match="noise.gguf"):
        load_checkpoint(bad)


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*llama.*qwen2"):
        load_checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path, tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors_is_corrupt(tmp_path, tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_sharded_safetensors_load(tmp_path, tiny_model_dir):
    folder, ref = tiny_model_dir("qwen2-bias")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a, b = build_model(folder), build_model(tmp_path)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def _assert_logits_equal_transformers(path, length: int) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    ours = build_model(path)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                               quantization_config=GgufConfig(dequantize=True)).eval()
    ids = torch.randint(3, 10000, (1, length), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(ours.config, 1, length, torch.float32, "cpu")
    logits = ours(ids, torch.arange(length)[None], cache)
    with torch.no_grad():
        expected = ref(ids).logits
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.real
def test_smollm_gguf_logits_equal_transformers(smollm_gguf):
    _assert_logits_equal_transformers(smollm_gguf, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf", "gemma-3-270m.Q4_K_M.gguf"])
def test_other_real_gguf_logits_equal_transformers(name, smollm_gguf):
    path = smollm_gguf.parent / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    _assert_logits_equal_transformers(path, 600)  # longer than gemma's 512-token sliding window


def test_gguf_tensors_are_dequantized_when_read_and_freed_when_popped(smollm_gguf):
    from leaplm.models.load import LazyTensors

    _, tensors, _ = load_checkpoint(smollm_gguf)
    assert isinstance(tensors, LazyTensors)
    n, name = len(tensors), "model.layers.0.self_attn.q_proj.weight"
    read = tensors[name]
    assert read.dtype == torch.float32 and read.shape == (576, 576)
    assert torch.equal(tensors.pop(name), read)   # the same values, built again from the mapped file
    assert len(tensors) == n - 1 and name not in tensors and tensors.pop(name, None) is None
    with pytest.raises(KeyError):
        tensors.pop(name)


def test_loading_consumes_the_tensors_and_quantizes_block_by_block(tiny_model_dir, monkeypatch):
    """``build_model(quantization=...)`` quantizes each block as soon as it is loaded (its float weights are
    gone before the next block is read) and gives the model quantizing the loaded float model gives."""
    from leaplm import quant
    from leaplm.models import transformer

    folder, _ = tiny_model_dir("llama-gqa-untied")
    seen = []   # the blocks quantized one by one, and whether the blocks after each were still unread
    original = quant.quantize_model

    def spy(model, mode, whole=True):
        if not whole:
            blocks = list(model_being_loaded[0].blocks)
            later = blocks[blocks.index(model) + 1:]
            seen.append((model, all(b.attn.qkv.weight.device.type == "meta" for b in later)))
        return original(model, mode, whole)

    model_being_loaded = []
    init = transformer.Transformer.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        model_being_loaded[:] = [self]

    monkeypatch.setattr(transformer.Transformer, "__init__", remember)
    monkeypatch.setattr(quant, "quantize_model", spy)
    import leaplm.models.load as load_module

    monkeypatch.setattr(load_module, "quantize_model", spy)   # load.py imports it by name
    by_block = build_model(folder, quantization="int8")
    assert [m for m, _ in seen] == list(by_block.blocks) and all(unread for _, unread in seen)
    reference = original(build_model(folder), "int8")
    ids = torch.tensor([[1, 5, 9, 33, 70, 12]])
    logits = [m(ids, torch.arange(6)[None], KVCache.for_model(m.config, 1, 6, torch.float32, "cpu"))
              for m in (by_block, reference)]
    assert torch.equal(*logits)

    _, tensors, _ = load_checkpoint(folder)
    with torch.device("meta"):
        model = transformer.Transformer(by_block.config)
    model.load_weights(tensors, torch.float32, "cpu")
    assert not tensors   # every tensor was taken (popped) as it was assigned


# ---------------------------------------------------------------------- config.json and the shard index
def _sharded_copy(tmp_path, tiny_model_dir):
    _, ref = tiny_model_dir("qwen2-bias")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    return tmp_path / "model.safetensors.index.json"


@pytest.mark.parametrize("index_text, message", [
    ("{not json", r"model\.safetensors\.index\.json is not valid JSON: Expecting property name"),
    ('{"metadata": {}}', r'model\.safetensors\.index\.json has no "weight_map" \(tensor name -> shard file\)'),
    ("[1, 2]", r'model\.safetensors\.index\.json has no "weight_map"'),
    ('{"weight_map": []}', r'"weight_map" must be a non-empty object of tensor name -> shard file, not \[\]'),
    ('{"weight_map": {}}', r'"weight_map" must be a non-empty object'),
    ('{"weight_map": {"a": "model-9.safetensors"}}',
     r"index\.json lists shards that are not in .*: model-9\.safetensors"),
    ('{"weight_map": {"a": "../x.safetensors", "b": 3, "c": "model.bin"}}',
     r"names shards that are not \.safetensors file names in its folder: '\.\./x\.safetensors', 'model\.bin', 3"),
])
def test_malformed_shard_index_is_corrupt_and_named(tmp_path, tiny_model_dir, index_text, message):
    from leaplm.models.load import check_checkpoint

    index = _sharded_copy(tmp_path, tiny_model_dir)
    index.write_text(index_text)
    for load in (check_checkpoint, load_checkpoint):
        with pytest.raises(CorruptModelError, match=message):
            load(tmp_path)


def test_missing_shard_is_named_with_its_index(tmp_path, tiny_model_dir):
    index = _sharded_copy(tmp_path, tiny_model_dir)
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CorruptModelError, match=rf"index\.json lists shards that are not in .*: {shard}$"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("config_text, error, message", [
    ("{not json", CorruptModelError, r"config\.json is not valid JSON: Expecting property name"),
    (b"\xff\xfe{}", CorruptModelError, r"config\.json is not valid JSON"),
    ('["llama"]', CorruptModelError, r"config\.json holds a JSON list, not an object of model settings"),
    (None, CorruptModelError, r"config\.json has an invalid value: ValueError: invalid literal for int\(\)"),
    ('{"model_type": "llama"}', UnsupportedModelError, r"config\.json lacks the field 'hidden_size'"),
])
def test_bad_config_json_is_named(tmp_path, tiny_model_dir, config_text, error, message):
    from leaplm.models.load import check_checkpoint

    folder, _ = tiny_model_dir("llama-gqa-untied")
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    if config_text is None:   # a field of the wrong type
        config_text = json.dumps({**json.loads((folder / "config.json").read_text()), "hidden_size": "big"})
    (tmp_path / "config.json").write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
    for load in (check_checkpoint, load_checkpoint):
        with pytest.raises(error, match=message):
            load(tmp_path)
