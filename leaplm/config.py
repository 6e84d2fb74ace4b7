"""ModelConfig: everything the transformer needs to know about a checkpoint, as one frozen dataclass.

One decoder-only implementation serves every supported family; the families differ only in the
flags below. Two constructors read the two checkpoint formats:

- ``ModelConfig.from_hf(config_dict)`` — a Hugging Face ``config.json`` (transformers 4.x
  ``rope_theta``/``rope_scaling`` or 5.x ``rope_parameters``).
- ``ModelConfig.from_gguf(metadata)`` — the key/value metadata of a GGUF file (llama.cpp names).

Families: llama (Llama 2/3, SmolLM2, TinyLlama), mistral, qwen2 (qkv bias), qwen3 (q/k norm),
gemma3 (q/k norm, sandwich norms, (1 + w) norms, scaled embeddings, sliding-window layers with
their own RoPE base, GELU-tanh MLP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (gemma3 has one for full and one for sliding layers).

    ``scaling`` is a Hugging Face style dict (``rope_type`` plus its knobs) or None.
    """

    theta: float
    scaling: Mapping[str, Any] | None = None

    @property
    def rope_type(self) -> str:
        if not self.scaling:
            return "default"
        return str(self.scaling.get("rope_type") or self.scaling.get("type") or "default")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_local: RopeConfig | None = None      # RoPE of sliding-window layers when it differs
    attention_bias: bool = False              # qwen2: bias on q, k, v projections
    qk_norm: bool = False                     # qwen3, gemma3: RMSNorm over head_dim on q and k
    sandwich_norm: bool = False               # gemma3: extra norms after attention and after MLP
    norm_offset: float = 0.0                  # gemma: weights stored as w, applied as (1 + w)
    embed_scale: float | None = None          # gemma: embeddings multiplied by sqrt(hidden)
    hidden_act: str = "silu"                  # "silu" | "gelu_tanh"
    attn_scale: float | None = None           # None -> head_dim ** -0.5
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())   # per layer: "full" | "sliding"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.family!r}; leaplm runs: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(
                f"config lists {len(self.layer_types)} layer types for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for rope in (self.rope, self.rope_local):
            if rope is not None and rope.rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"unsupported RoPE scaling {rope.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type in ("gemma3", "gemma3_text"):
            # published gemma-3 multimodal configs omit every field equal to Gemma3TextConfig's default
            cfg = {**_GEMMA3_DEFAULTS, **cfg}
        family = _HF_MODEL_TYPES.get(str(model_type))
        if family is None:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r}{' (' + ', '.join(archs) + ')' if archs else ''}; "
                f"leaplm runs: {', '.join(sorted(_HF_MODEL_TYPES))}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rope, rope_local = _hf_rope(cfg, family)
            sliding, layer_types = _hf_layer_types(cfg, family, layers)
            gemma = family == "gemma3"
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rope=rope,
                rope_local=rope_local,
                attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
                qk_norm=family in ("qwen3", "gemma3"),
                sandwich_norm=gemma,
                norm_offset=1.0 if gemma else 0.0,
                embed_scale=math.sqrt(hidden) if gemma else None,
                hidden_act=_act(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
                attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
                sliding_window=sliding,
                layer_types=layer_types,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks the field {e.args[0]!r}") from None

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, vocab_size: int, has_output: bool) -> "ModelConfig":
        """``meta``: GGUF key -> python value. ``vocab_size``: rows of token_embd.
        ``has_output``: whether the file has a separate ``output.weight`` (else tied)."""
        arch = str(meta.get("general.architecture"))
        if arch not in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; leaplm runs: llama, mistral, qwen2, qwen3, gemma3"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        layers = int(get("block_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type and scaling_type != "none":
            scaling = {
                "rope_type": scaling_type,
                "factor": float(get("rope.scaling.factor")),
            }
            if scaling_type == "yarn":
                scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        # llama3-style scaling is stored in GGUF as a rope_freqs tensor, which the loader applies.
        rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)), scaling=scaling)
        gemma = arch == "gemma3"
        sliding = None
        layer_types: tuple[str, ...] = ()
        rope_local = None
        if gemma:
            sliding = int(get("attention.sliding_window"))
            # llama.cpp's gemma3: every 6th layer is global, the rest use the sliding window.
            layer_types = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(layers))
            rope_local = RopeConfig(theta=10000.0)
        elif meta.get(f"{arch}.attention.sliding_window"):
            sliding = int(meta[f"{arch}.attention.sliding_window"])
            layer_types = ("sliding",) * layers
        return cls(
            family="mistral" if arch == "mistral" else arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 4096)),
            rope=rope,
            rope_local=rope_local,
            attention_bias=False,  # set by the loader from the presence of bias tensors
            qk_norm=arch in ("qwen3", "gemma3"),
            sandwich_norm=gemma,
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=math.sqrt(hidden) if gemma else None,
            hidden_act="gelu_tanh" if gemma else "silu",
            # llama.cpp scales gemma3 queries by 1/sqrt(head_dim) (query_pre_attn_scalar == head_dim)
            attn_scale=head_dim ** -0.5 if gemma else None,
            sliding_window=sliding,
            layer_types=layer_types,
            tie_word_embeddings=not has_output,
        )


_GEMMA3_DEFAULTS = {
    "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "query_pre_attn_scalar": 256, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "sliding_window_pattern": 6,
    "hidden_activation": "gelu_pytorch_tanh",
}


def _act(name: str) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return "gelu_tanh"
    raise UnsupportedModelError(f"unsupported activation {name!r}; supported: silu, gelu_pytorch_tanh")


def _rope_from(params: Mapping[str, Any] | None, theta_default: float) -> RopeConfig:
    params = dict(params or {})
    theta = float(params.pop("rope_theta", theta_default))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return RopeConfig(theta=theta, scaling=None if rope_type == "default" else {**params, "rope_type": rope_type})


def _hf_rope(cfg: Mapping[str, Any], family: str) -> tuple[RopeConfig, RopeConfig | None]:
    theta = float(cfg.get("rope_theta", 10000.0))
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4.x layout
        rope = _rope_from(cfg.get("rope_scaling"), theta)
        local = None
        if family == "gemma3":
            local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
        return rope, local
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (gemma3, 5.x)
        full = _rope_from(params.get("full_attention"), theta)
        local = _rope_from(params.get("sliding_attention"), 10000.0) if "sliding_attention" in params else None
        return full, local
    return _rope_from(params, theta), None


def _hf_layer_types(cfg: Mapping[str, Any], family: str, layers: int) -> tuple[int | None, tuple[str, ...]]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types:
        mapped = tuple("sliding" if t == "sliding_attention" else "full" for t in types)
        return (int(window) if window and "sliding" in mapped else None), mapped
    if family in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window") or not window:
            return None, ()
        first = int(cfg.get("max_window_layers", layers))
        return int(window), tuple("sliding" if i >= first else "full" for i in range(layers))
    if family == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return int(window), tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers))
    if window:
        return int(window), ("sliding",) * layers
    return None, ()
