"""ModelConfig parsing: transformers 4.x and 5.x config layouts, GGUF metadata, refusals."""
import pytest

from leaplm.config import ModelConfig
from leaplm.errors import UnsupportedModelError

LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def test_rope_layouts_of_transformers_4_and_5_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_hf({**LLAMA, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = ModelConfig.from_hf({**LLAMA, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4 == v5 and v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0


def test_gemma3_v4_layout_uses_local_rope_and_pattern():
    cfg = ModelConfig.from_hf({**LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 32,
                               "query_pre_attn_scalar": 32, "sliding_window": 512, "rope_theta": 1e6,
                               "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
                               "hidden_activation": "gelu_pytorch_tanh"})
    assert cfg.layer_types == ("sliding",) * 5 + ("full",)
    assert cfg.rope.theta == 1e6 and cfg.rope_local.theta == 10000.0
    assert cfg.norm_offset == 1.0 and cfg.embed_scale == pytest.approx(8.0) and cfg.tie_word_embeddings


def test_qwen2_sliding_window_only_when_enabled():
    base = {**LLAMA, "model_type": "qwen2", "sliding_window": 4096, "max_window_layers": 1}
    assert ModelConfig.from_hf({**base, "use_sliding_window": False}).sliding_window is None
    on = ModelConfig.from_hf({**base, "use_sliding_window": True})
    assert on.layer_types == ("full", "sliding") and on.attention_bias


def test_gguf_metadata():
    meta = {"general.architecture": "gemma3", "gemma3.embedding_length": 640, "gemma3.block_count": 12,
            "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.attention.sliding_window": 512,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6, "gemma3.context_length": 32768}
    cfg = ModelConfig.from_gguf(meta, vocab_size=1000, has_output=False)
    assert cfg.layer_types.count("full") == 2 and cfg.layer_types[5] == "full" and cfg.head_dim == 256
    assert cfg.tie_word_embeddings and cfg.scale == pytest.approx(1 / 16)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt_neox"}, "gpt_neox"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"hidden_act": "relu"}, "relu"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_refusals_name_the_problem(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf({**LLAMA, **change})


def test_unsupported_gguf_arch_is_named():
    with pytest.raises(UnsupportedModelError, match="phi3"):
        ModelConfig.from_gguf({"general.architecture": "phi3"}, vocab_size=10, has_output=True)


def test_sparse_gemma3_multimodal_config_gets_the_text_defaults():
    cfg = ModelConfig.from_hf({"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (8, 4, 256)
    assert cfg.rope.theta == 1e6 and cfg.rope.rope_type == "linear" and cfg.rope_local.theta == 1e4
    assert cfg.layer_types[5] == "full" and cfg.layer_types[0] == "sliding" and cfg.sliding_window == 1024
