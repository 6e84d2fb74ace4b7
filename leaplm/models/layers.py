"""Building blocks of the decoder: RMSNorm, rotary embeddings (with scaling), linear layers.

Conventions: activations are ``[B, T, hidden]``; per-head tensors ``[B, T, heads, head_dim]``.
Norm weights are stored as the *effective* multiplier (gemma's ``1 + w`` is folded in at load).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RopeConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and not torch.compiler.is_compiling():  # one kernel, same result
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Linear(nn.Module):
    """A weight-holding projection ``y = x @ W.T (+ b)``; W is ``[out, in]``.

    Kept as our own module so quantized variants can replace it without touching the model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``; inside the compiled step on a 2-D view (inductor's batched-matmul lowering cannot
    take the step's unbacked batch and time sizes)."""
    if not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


def rope_inv_freq(rope: RopeConfig, head_dim: int, freq_factors: Tensor | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (float32) and the cos/sin scaling factor.

    Implements the rope types of transformers' ``ROPE_INIT_FUNCTIONS``: default, linear, llama3,
    yarn. ``freq_factors`` (GGUF ``rope_freqs.weight``) divide the frequencies, which is how
    llama.cpp stores llama3 scaling.
    """
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    attention_factor = 1.0
    scaling = rope.scaling or {}
    kind = rope.rope_type
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(rope, head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    return inv_freq, attention_factor


def _yarn(rope: RopeConfig, dim: int) -> tuple[Tensor, float]:
    s = rope.scaling or {}
    base, factor = rope.theta, float(s["factor"])
    old_ctx = int(s.get("original_max_position_embeddings") or 4096)
    attention_factor = s.get("attention_factor")
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin for given positions. ``forward(positions [B, T]) -> (cos, sin)`` each ``[B, T, 1, D]``."""

    def __init__(self, rope: RopeConfig, head_dim: int, freq_factors: Tensor | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(rope, head_dim, freq_factors)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, D]`` (rotate-half layout, as transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
