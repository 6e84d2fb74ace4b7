"""Shared fixtures: tiny random checkpoints built with transformers, and the real SmolLM2 GGUF.

Tiny models: every supported family, saved as safetensors folders, so leaplm's loader, model and
engine are checked against transformers' own implementation of the same weights.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_configs() -> dict:
    """name -> transformers config for every family and feature the runtime claims."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama-gqa-untied": LlamaConfig(**_BASE, tie_word_embeddings=False),
        "llama-mha-tied": LlamaConfig(**{**_BASE, "num_key_value_heads": 4}, tie_word_embeddings=True),
        "llama3-rope-scaling": LlamaConfig(**_BASE, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "llama-linear-rope": LlamaConfig(**_BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "mistral-sliding": MistralConfig(**_BASE, sliding_window=8, head_dim=16),
        "qwen2-bias": Qwen2Config(**_BASE, tie_word_embeddings=True),
        "qwen2-yarn": Qwen2Config(**_BASE, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen3-qknorm": Qwen3Config(**_BASE, head_dim=32, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(**_BASE, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    }


def build_tiny(name: str, folder: Path):
    """Build + save a tiny random model; return the transformers model (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(zlib.crc32(name.encode()))  # stable across processes (str hash is salted)
    model = AutoModelForCausalLM.from_config(tiny_configs()[name], dtype=torch.float32)
    with torch.no_grad():  # random, not-tiny weights so errors are not hidden by near-zero activations
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if "gemma" not in name else p.copy_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: name -> (folder, transformers model); built once per session."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = (folder, build_tiny(name, folder))
        return built[name]

    return get


def models_dir() -> Path:
    return Path(os.environ.get("LEAPLM_MODELS", Path.home() / ".cache" / "leaplm" / "models"))


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    path = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"real model not present: {path} (run `leaplm models fetch smollm2-135m-instruct`)")
    return path
