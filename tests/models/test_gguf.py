"""GGUF path without any download: tiny random transformers models written as GGUF files the way
llama.cpp's converter writes them (llama Q/K rows permuted, gemma norms stored as 1 + w), loaded by
leaplm and compared with the original transformers model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.errors import UnsupportedModelError
from leaplm.models.load import build_model

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm", "pre_feedforward_layernorm": "ffn_norm",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py's permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(ref, arch: str, path, f16: bool, q8: bool = False) -> None:
    import gguf

    cfg = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"]))
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    gemma = arch == "gemma3"
    for name, p in ref.state_dict().items():
        t = p.float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            module, suffix = rest.rsplit(".", 1)
            if module == "post_attention_layernorm":
                kind = "post_attention_norm" if gemma else "ffn_norm"
            else:
                kind = GGUF_NAMES[module]
            out = f"blk.{layer}.{kind}.{suffix}"
            if arch == "llama" and kind == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif arch == "llama" and kind == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
        if gemma and out.endswith("norm.weight"):
            t = t + 1.0
        if f16 and t.ndim == 2:
            t = t.astype(np.float16)
        if q8 and t.ndim == 2:  # llama.cpp's Q8_0 blocks, as a low-bit file stores them
            q = gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(out, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        w.add_tensor(out, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name, arch", [("llama-gqa-untied", "llama"), ("qwen2-bias", "qwen2"),
                                        ("qwen3-qknorm", "qwen3"), ("gemma3", "gemma3")])
@pytest.mark.parametrize("f16", [False, True])
def test_gguf_written_like_llamacpp_loads_to_the_same_model(name, arch, f16, tiny_model_dir, tmp_path):
    _, ref = tiny_model_dir(name)
    if arch == "gemma3":
        ref = _as_llamacpp_gemma3(ref)
    if f16:  # the oracle gets the same rounding the file applies to matrices
        ref = _rounded_copy(ref)
    path = tmp_path / f"{name}.gguf"
    write_gguf(ref, arch, path, f16)
    model = build_model(path)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model.config, 1, 30, torch.float32, "cpu")
    ours = model(ids, torch.arange(30)[None], cache)
    with torch.no_grad():
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def _rounded_copy(ref):
    import copy

    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return ref


def _as_llamacpp_gemma3(ref):
    """llama.cpp's gemma3 fixes the layer pattern (every 6th layer global) and scales queries by
    1/sqrt(head_dim) (real gemma-3 checkpoints below 27B have query_pre_attn_scalar == head_dim):
    give the oracle the same."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(ref.config)
    cfg.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    cfg.query_pre_attn_scalar = cfg.head_dim
    new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    new.load_state_dict(ref.state_dict())
    return new


def test_unknown_block_type_is_named(tmp_path, monkeypatch):
    import gguf

    from leaplm.models import load

    def refuse(data, qtype):
        raise NotImplementedError

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    t = type("T", (), {"tensor_type": gguf.GGMLQuantizationType.IQ2_XXS, "data": np.zeros(4, np.uint8),
                        "name": "blk.0.ffn_up.weight", "shape": np.array([4])})()
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load.dequantize(t)


# ---------------------------------------------------------------------- the header reader, integrity
@pytest.fixture
def tiny_gguf(tiny_model_dir, tmp_path):
    """A tiny llama GGUF with Q8_0 matrices and float32 norms, as a low-bit file stores them."""
    _, ref = tiny_model_dir("llama-gqa-untied")
    path = tmp_path / "tiny.gguf"
    write_gguf(ref, "llama", path, f16=False, q8=True)
    return path


def _truncated_copy(src, dst, cut: int):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - cut])
    return dst


def test_header_reader_agrees_with_gguf_reader(tiny_gguf, tiny_model_dir, tmp_path):
    """leaplm's one-pass header walk gives gguf.GGUFReader's metadata, tensor table and tensor bytes (Q8_0,
    F16 and F32 tensors; every metadata value type; short arrays kept, long ones and the vocabulary left out)."""
    import gguf

    from leaplm.models import gguf_file
    from leaplm.models.load import open_gguf

    f16 = tmp_path / "f16.gguf"
    write_gguf(tiny_model_dir("llama-mha-tied")[1], "llama", f16, f16=True)
    meta = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(meta), "llama")
    w.add_bool("x.flag", True)
    w.add_int8("x.i8", -3)
    w.add_uint64("x.u64", 2 ** 63 + 5)
    w.add_float64("x.f64", 0.1)
    w.add_string("x.text", "héllo")
    w.add_array("x.short", [1, 2, 3])
    w.add_array("x.words", ["a", "bc"])
    w.add_array("x.long", list(range(gguf_file.KEPT_ARRAY_LEN + 1)))
    w.add_array("x.long_words", ["w"] * (gguf_file.KEPT_ARRAY_LEN + 1))
    w.add_token_list(["<s>", "a"])
    w.add_tensor("bf16.weight", np.zeros((2, 32), np.uint16).view(np.uint8).reshape(2, 64),
                 raw_shape=(2, 32), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.add_tensor("vec.weight", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    skipped = {"x.long", "x.long_words", "tokenizer.ggml.tokens"}
    for path in (tiny_gguf, f16, meta):
        ref = gguf.GGUFReader(str(path))
        header, opened = gguf_file.read_header(path), open_gguf(path)
        expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.") and k not in skipped}
        assert dict(header.metadata) == expected
        assert header.data_offset == ref.data_offset and header.file_size == path.stat().st_size
        assert [(t.name, t.tensor_type, t.shape, t.n_bytes, t.offset) for t in header.tensors] == \
            [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.n_bytes, t.data_offset) for t in ref.tensors]
        for mine, theirs in zip(opened.tensors, ref.tensors, strict=True):
            assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
            assert np.array_equal(mine.data, theirs.data)
    assert {t.tensor_type.name for t in gguf_file.read_header(tiny_gguf).tensors} == {"Q8_0", "F32"}
    assert {t.tensor_type.name for t in gguf_file.read_header(f16).tensors} == {"F16", "F32"}
    kept = gguf_file.read_header(meta).metadata
    assert kept["x.short"] == [1, 2, 3] and kept["x.words"] == ["a", "bc"] and "x.long" not in kept


def test_a_load_parses_the_header_once_and_never_builds_a_gguf_reader(tiny_gguf, monkeypatch):
    """The integrity check, the quantization choice and the weights all use one parse of the header
    (gguf.GGUFReader took 5-10 s per parse of a real file's vocabulary, and ran twice per load)."""
    import gguf

    from leaplm.models import gguf_file
    from leaplm.models.load import check_checkpoint
    from leaplm.quant import resolve_quantization

    parses = []
    real_parse = gguf_file._parse
    monkeypatch.setattr(gguf_file, "_parse", lambda *a: parses.append(1) or real_parse(*a))
    monkeypatch.setattr(gguf, "GGUFReader", None)   # calling it would raise
    gguf_file._read_header.cache_clear()
    check_checkpoint(tiny_gguf)
    assert resolve_quantization("auto", tiny_gguf, torch.device("cpu"), torch.float32) == "int8"
    model = build_model(tiny_gguf, quantization="int8")
    assert len(parses) == 1 and model.config.num_layers == 3
    tiny_gguf.write_bytes(tiny_gguf.read_bytes())   # a new version of the file (mtime) is parsed again
    check_checkpoint(tiny_gguf)
    assert len(parses) == 2


@pytest.mark.parametrize("cut", [1, 2000])
def test_truncated_gguf_names_the_missing_tensor_bytes_everywhere(tiny_gguf, tmp_path, cut):
    """A partial download (tensor data cut short, header intact) is reported as a truncated file by the
    checkpoint check, the loader, the tokenizer (which used to report a tokenizer failure) and LLM."""
    from leaplm import LLM
    from leaplm.errors import CorruptModelError
    from leaplm.models.load import check_checkpoint, load_checkpoint
    from leaplm.tokenizer import Tokenizer

    bad = _truncated_copy(tiny_gguf, tmp_path / "cut.gguf", cut)
    size = bad.stat().st_size
    message = (r"cut\.gguf is truncated or not a GGUF file: "
               rf"tensor '[\w.]+' ends at byte \d+ but the file has {size} bytes")
    for load in (check_checkpoint, load_checkpoint, Tokenizer.from_path, LLM):
        with pytest.raises(CorruptModelError, match=message):
            load(bad)


def _edit_tensor_info(data: bytes, name: str, field: str, value) -> bytes:
    """``data`` with one field of tensor ``name``'s info entry replaced ("name", "n_dims" or "offset")."""
    raw = name.encode()
    start = data.index(len(raw).to_bytes(8, "little") + raw)
    at = start + 8 + len(raw)
    n_dims = int.from_bytes(data[at: at + 4], "little")
    offset_at = at + 4 + 8 * n_dims + 4
    if field == "name":
        return data[: start + 8] + value.encode() + data[at:]
    if field == "n_dims":
        return data[:at] + value.to_bytes(4, "little") + data[at + 4:]
    old = int.from_bytes(data[offset_at: offset_at + 8], "little")
    return data[:offset_at] + (old + value).to_bytes(8, "little") + data[offset_at + 8:]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:20], "it has 20 bytes, fewer than a GGUF header's 24"),
    (lambda b: _edit_tensor_info(b, "output_norm.weight", "offset", 1),
     r"tensor 'output_norm\.weight' starts at data offset \d+, not a multiple of the alignment 32"),
    (lambda b: _edit_tensor_info(b, "blk.0.attn_q.weight", "name", "blk.0.attn_k.weight"),
     r"tensor 'blk\.0\.attn_k\.weight' appears twice"),
    (lambda b: _edit_tensor_info(b, "output_norm.weight", "n_dims", 7),
     r"tensor 'output_norm\.weight' has 7 dimensions \(GGUF allows 1 to 4\)"),
    (lambda b: b"GGUX" + b[4:], r"it starts with b'GGUX', not the GGUF magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "unknown GGUF version 7"),
    (lambda b: b[:300], r"its header runs past the end of the file \(300 bytes\) while reading"),
    (lambda b: b[:16] + (10 ** 18).to_bytes(8, "little") + b[24:], r"its header runs past .* reading metadata"),
])
def test_malformed_gguf_headers_are_named(tiny_gguf, tmp_path, damage, message):
    from leaplm.errors import CorruptModelError
    from leaplm.models.load import load_checkpoint

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(tiny_gguf.read_bytes()))
    with pytest.raises(CorruptModelError, match=r"bad\.gguf is truncated or not a GGUF file: " + message):
        load_checkpoint(bad)


def test_big_endian_gguf_is_refused_as_unsupported(tiny_gguf, tmp_path):
    from leaplm.models.load import load_checkpoint

    data = tiny_gguf.read_bytes()
    bad = tmp_path / "be.gguf"
    bad.write_bytes(data[:4] + (3).to_bytes(4, "big") + data[8:])
    with pytest.raises(UnsupportedModelError, match="big-endian"):
        load_checkpoint(bad)
