"""The decoder-only transformer shared by every supported family (flags in ModelConfig).

``Transformer.forward(tokens [B, T], positions [B, T], cache, ...) -> logits [B, K, vocab]``

- Every token's key/value is written into ``cache`` at its position; the cache's committed
  lengths are not touched (the engine commits).
- Attention of a query at position p covers cache slots ``<= p`` (and ``> p - window`` on
  sliding-window layers), so ragged batches and rolled-back slots need no extra bookkeeping.
- ``logit_index`` ``[B, K]`` picks the positions (indices into T) whose logits are computed; by
  default all T. Prefill asks for the last prompt token only, which saves a ``[T, vocab]`` matmul.

Weights use fused projections: ``qkv`` ``[(H + 2*KV) * D, hidden]`` and ``gate_up``
``[2 * I, hidden]``, built by ``load_weights`` from per-projection Hugging Face names.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..config import ModelConfig
from ..errors import CorruptModelError
from .layers import Linear, RMSNorm, Rotary, apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.scale
        self.sliding = cfg.layer_types[layer] == "sliding"

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache, step: "_Step") -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.write(self.layer, k, v, step.positions, step.contiguous_start)
        keys, values = cache.view(self.layer, step.kv_len)
        if step.exact is not None:
            return self.o(self._exact_attention(q, keys, values, step).reshape(B, T, self.q_size))
        mask, causal = (step.sliding_mask, step.sliding_causal) if self.sliding else (step.full_mask, step.full_causal)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, D]
        return self.o(out.transpose(1, 2).reshape(B, T, self.q_size))

    def _exact_attention(self, q: Tensor, keys: Tensor, values: Tensor, step: "_Step") -> Tensor:
        """One unmasked call per (row, query) over exactly its visible slots -> ``[B, T, H, D]``."""
        B, T = q.shape[:2]
        out = torch.empty_like(q)
        for b in range(B):
            for t, pos in enumerate(step.exact[b]):
                lo = max(0, pos + 1 - step.window) if self.sliding and step.window else 0
                out[b, t] = F.scaled_dot_product_attention(
                    q[b: b + 1, t: t + 1].transpose(1, 2), keys[b: b + 1, :, lo: pos + 1], values[b: b + 1, :, lo: pos + 1],
                    scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)[0, :, 0]
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down(gate * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = MLP(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps) if cfg.sandwich_norm else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps) if cfg.sandwich_norm else None
        self.sliding = cfg.layer_types[layer] == "sliding"

    def forward(self, x: Tensor, ropes: dict, cache: KVCache, step: "_Step") -> Tensor:
        h = self.attn(self.attn_norm(x), ropes["sliding" if self.sliding else "full"], cache, step)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class _Step:
    """Per-forward attention geometry shared by all layers.

    Masks are built only where needed: a fresh prefill (positions ``0..T-1`` in every row, no
    earlier slots) is plain causal attention (``is_causal``, the fast kernel path), and a single
    decode query sees every slot below it. Otherwise ``[B, 1, T, S]`` boolean masks.

    ``exact`` (batch-invariant decoding): for a decode/verify step (not a fresh prefill, at most
    ``EXACT_MAX_T`` queries) every query of every row is attended on its own, unmasked, over exactly
    the slots it sees — the same kernel call a batch-1 single-token decode makes — so a row's
    result does not depend on the other rows or on how many draft tokens share the pass.
    ``self.exact`` is then the host list of positions ``[B][T]``, else None.
    """

    EXACT_MAX_T = 64

    def __init__(self, positions: Tensor, cfg: ModelConfig, kv_len: int, contiguous_start: int | None,
                 exact: bool = False) -> None:
        self.positions = positions
        self.kv_len = kv_len
        self.contiguous_start = contiguous_start
        B, T = positions.shape
        fresh = contiguous_start == 0 and kv_len == T
        self.window = cfg.sliding_window if "sliding" in cfg.layer_types else None
        # a batch-1 single-token step without an active window already is that one unmasked call
        plain_single = B == 1 and T == 1 and (self.window is None or kv_len <= self.window)
        self.exact = positions.tolist() if exact and not fresh and not plain_single and T <= self.EXACT_MAX_T else None
        if self.exact is not None:  # no masks needed
            self.full_causal = self.sliding_causal = False
            self.full_mask = self.sliding_mask = None
            return
        single = B == 1 and T == 1
        self.full_causal = fresh and T > 1
        self.full_mask = None
        causal = None
        if not (fresh or single):
            slots = torch.arange(kv_len, device=positions.device)
            causal = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
            self.full_mask = causal[:, None]
        self.sliding_causal, self.sliding_mask = self.full_causal, self.full_mask
        window = self.window
        if window is not None and not ((single and kv_len <= window) or (fresh and T <= window)):
            slots = torch.arange(kv_len, device=positions.device)
            if causal is None:
                causal = slots[None, None, :] <= positions[:, :, None]
            in_window = slots[None, None, :] > positions[:, :, None] - window
            self.sliding_causal, self.sliding_mask = False, (causal & in_window)[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_freq_factors: Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.quantization: str | None = None   # set by leaplm.quant.quantize_model
        self.exact = False   # batch-invariant attention for decode steps (see _Step); set with int8 weights
        self.reset_rotary(rope_freq_factors)

    def reset_rotary(self, freq_factors: Tensor | None = None) -> None:
        """(Re)compute the RoPE tables on CPU (they are derived from the config, not loaded)."""
        cfg = self.config
        with torch.device("cpu"):
            self.rotary = nn.ModuleDict({"full": Rotary(cfg.rope, cfg.head_dim, freq_factors)})
            if "sliding" in cfg.layer_types:
                self.rotary["sliding"] = Rotary(cfg.rope_local or cfg.rope, cfg.head_dim, freq_factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        *,
        logit_index: Tensor | None = None,
        kv_len: int | None = None,
        contiguous_start: int | None = None,
    ) -> Tensor:
        """tokens, positions ``[B, T]`` -> logits ``[B, K, vocab]`` (float32).

        ``kv_len``: 1 + the largest position in ``positions`` (pass it to avoid a device sync).
        ``contiguous_start``: every row's positions are ``start .. start+T-1`` (fast cache write).
        """
        cfg = self.config
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        step = _Step(positions, cfg, kv_len, contiguous_start, exact=self.exact)
        x = F.embedding(tokens, self.embed)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        ropes = {name: rot(positions, x.dtype) for name, rot in self.rotary.items()}
        ropes.setdefault("sliding", ropes["full"])
        for block in self.blocks:
            x = block(x, ropes, cache, step)
        if logit_index is not None:
            x = torch.gather(x, 1, logit_index[:, :, None].expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed)
        return logits.float()

    # ------------------------------------------------------------------ weights
    def load_weights(self, tensors: Mapping[str, Tensor], dtype: torch.dtype, device) -> None:
        """Load Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...).

        Every source arrives in Hugging Face convention (the GGUF loader undoes llama.cpp's
        changes); ``config.norm_offset`` is added to norm weights here (gemma's ``1 + w``).
        """
        cfg = self.config
        used: set[str] = set()

        def take(name: str) -> Tensor:
            if name not in tensors:
                raise CorruptModelError(f"checkpoint lacks tensor {name!r}")
            used.add(name)
            return tensors[name].to(device=device, dtype=dtype)

        def norm(module: RMSNorm, name: str) -> None:
            w = tensors.get(name)
            if w is None:
                raise CorruptModelError(f"checkpoint lacks tensor {name!r}")
            used.add(name)
            module.weight = nn.Parameter((w.float() + cfg.norm_offset).to(device=device, dtype=dtype),
                                         requires_grad=False)

        def param(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.contiguous(), requires_grad=False)

        self.embed = param(take("model.embed_tokens.weight"))
        for i, block in enumerate(self.blocks):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            block.attn.qkv.weight = param(torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]))
            if cfg.attention_bias:
                block.attn.qkv.bias = param(torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"]))
            block.attn.o.weight = param(take(a + "o_proj.weight"))
            if cfg.qk_norm:
                norm(block.attn.q_norm, a + "q_norm.weight")
                norm(block.attn.k_norm, a + "k_norm.weight")
            m = p + "mlp."
            block.mlp.gate_up.weight = param(torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]))
            block.mlp.down.weight = param(take(m + "down_proj.weight"))
            norm(block.attn_norm, p + "input_layernorm.weight")
            if cfg.sandwich_norm:
                norm(block.post_attn_norm, p + "post_attention_layernorm.weight")
                norm(block.mlp_norm, p + "pre_feedforward_layernorm.weight")
                norm(block.post_mlp_norm, p + "post_feedforward_layernorm.weight")
            else:
                norm(block.mlp_norm, p + "post_attention_layernorm.weight")
        norm(self.norm, "model.norm.weight")
        if self.lm_head is not None:
            self.lm_head.weight = param(take("lm_head.weight"))
        self.rotary.to(device)
