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
