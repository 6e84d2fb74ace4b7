"""The decoder-only transformer shared by every supported family (flags in ModelConfig).

``Transformer.forward(tokens [B, T], positions [B, T], cache, ...) -> logits [B, K, vocab]``

- Every token's key/value is written into ``cache`` at its position; the cache's committed
  lengths are not touched (the engine commits).
- Attention of a query at position p covers cache slots ``<= p`` (and ``> p - window`` on
  sliding-window layers), so ragged batches and rolled-back slots need no extra bookkeeping.
- ``logit_index`` ``[B, K]`` picks the positions (indices into T) whose logits are computed; by
  default all T. Prefill asks for the last prompt token only, which saves a ``[T, vocab]`` matmul.
- Token trees (``tree=(base, feed_mask)``, see ``speculative/tree.py``): row b's T fed tokens are written
  into slots ``base[b] .. base[b] + T - 1`` (not at their positions, which repeat across branches),
  and token t sees the committed slots ``< base[b]`` plus the fed tokens ``j`` with
  ``feed_mask[b, t, j]`` (its ancestors and itself).

Weights use fused projections: ``qkv`` ``[(H + 2*KV) * D, hidden]`` and ``gate_up``
``[2 * I, hidden]``, built by ``load_weights`` from per-projection Hugging Face names.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..config import ModelConfig
from ..errors import CorruptModelError
from .layers import Linear, RMSNorm, Rotary, apply_rotary, linear


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
        self.native = False   # inside the compiled step: attend with leaplm_native::attend (set by CompiledStep)

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
        if cache is None:   # inside the compiled step: cache and geometry come from the active step
            if self.native:
                return self.o(torch.ops.leaplm_native.attend(q, k, v, self.layer, int(self.sliding), self.scale))
            return self.o(torch.ops.leaplm.attend(q, k, v, self.layer))
        return self.o(self.attend(q, k, v, cache, step))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, step: "_Step") -> Tensor:
        """Write ``k, v [B, T, KV, D]`` into the cache, attend with ``q [B, T, H, D]`` -> ``[B, T, H * D]``.
        A paged step (``models/paged.py``) attends over its pool instead (``B = 1``, one flat pass)."""
        if getattr(step, "paged", False):
            return step.attend(self, q, k, v, cache)
        B, T = q.shape[:2]
        cache.write(self.layer, k, v, step.slots, step.contiguous_start)
        keys, values = cache.view(self.layer, step.kv_len)
        if step.exact:
            return self._exact_attention(q, keys, values, step).reshape(B, T, self.q_size)
        mask, causal = (step.sliding_mask, step.sliding_causal) if self.sliding else (step.full_mask, step.full_causal)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, T, D]
        return out.transpose(1, 2).reshape(B, T, self.q_size)

    def _exact_attention(self, q: Tensor, keys: Tensor, values: Tensor, step: "_Step") -> Tensor:
        """One unmasked call per (row, query) over exactly its visible slots -> ``[B, T, H, D]``.

        The query's heads are laid out as ``[kv_heads, group, D]`` (the heads sharing a key/value head
        become that head's queries), so no call expands keys for grouped-query attention. A tree query
        whose ancestors are not contiguous slots attends over a row buffer holding the committed slots
        followed by its ancestors in depth order: the same keys in the same order as the chain it lies
        on, so its result is the chain's bit for bit.
        """
        B, T = q.shape[:2]
        kv, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        for b in range(B):
            spans = step.exact_slots(b, self.sliding)
            buf_k = buf_v = None
            for t, (lo, hi, ancestors) in enumerate(spans):
                query = q[b, t].view(kv, group, self.head_dim)[None]
                if ancestors is None:
                    k, v = keys[b: b + 1, :, lo: hi], values[b: b + 1, :, lo: hi]
                else:
                    if buf_k is None:  # committed slots copied once per row and layer
                        buf_k = keys.new_empty(1, kv, hi + T, self.head_dim)
                        buf_v = values.new_empty(1, kv, hi + T, self.head_dim)
                        buf_k[:, :, :hi], buf_v[:, :, :hi] = keys[b: b + 1, :, :hi], values[b: b + 1, :, :hi]
                    end = hi + len(ancestors)
                    buf_k[:, :, hi: end] = keys[b: b + 1].index_select(2, ancestors)
                    buf_v[:, :, hi: end] = values[b: b + 1].index_select(2, ancestors)
                    start = min(lo, hi)  # lo > hi: the window leaves no committed slot
                    k, v = buf_k[:, :, start: end], buf_v[:, :, start: end]
                out[b, t] = F.scaled_dot_product_attention(query, k, v, scale=self.scale)[0].reshape(
                    self.num_heads, self.head_dim)
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


EXACT_MAX_T = 64   # widest decode/verify pass attended per query in exact mode (wider: batched, not invariant)


class _Step:
    """Per-forward attention geometry shared by all layers.

    Masks are built only where needed: a fresh prefill (positions ``0..T-1`` in every row, no
    earlier slots) is plain causal attention (``is_causal``, the fast kernel path), and a single
    decode query sees every slot below it. Otherwise ``[B, 1, T, S]`` boolean masks. A query sees a
    slot when the slot is committed below it (chains: slot <= position) or, in a tree, when the
    slot holds one of its ancestors; on sliding layers also only when the slot's *position* is
    within the window.

    ``exact`` (batch-invariant decoding): for a decode/verify step (not a fresh prefill, at most
    ``EXACT_MAX_T`` queries) every query of every row is attended on its own, unmasked, over exactly
    the slots it sees — the same kernel call a batch-1 single-token decode makes — so a row's
    result does not depend on the other rows or on how many draft tokens share the pass.
    """

    def __init__(self, positions: Tensor, cfg: ModelConfig, kv_len: int, contiguous_start: int | None,
                 exact: bool = False, tree: tuple[list[int], Tensor] | None = None) -> None:
        self.positions = positions
        self.kv_len = kv_len
        B, T = positions.shape
        device = positions.device
        self.tree_base, self.feed_mask = (None, None) if tree is None else tree
        if tree is not None:
            base = torch.tensor(self.tree_base, device=device)
            self.slots = base[:, None] + torch.arange(T, device=device)
            same = all(n == self.tree_base[0] for n in self.tree_base)
            contiguous_start = self.tree_base[0] if same else None
        else:
            self.slots = positions
        self.contiguous_start = contiguous_start
        fresh = tree is None and contiguous_start == 0 and kv_len == T
        self.decode = not fresh and T <= EXACT_MAX_T   # a decode or verify pass (what the compiled step runs)
        self.window = cfg.sliding_window if "sliding" in cfg.layer_types else None
        # batch-1 single-token decode steps take the same per-query call, so speculation matches them
        self.exact = exact and self.decode
        if self.decode:  # per-query visible slots (exact_slots), for exact and native attention
            self._positions = positions.tolist()
            self._exact_cache: dict = {}
            self._feed = None if tree is None else self.feed_mask.tolist()
        if self.exact:  # no masks needed
            self.full_causal = self.sliding_causal = False
            self.full_mask = self.sliding_mask = None
            return
        single = tree is None and B == 1 and T == 1
        self.full_causal = fresh and T > 1
        self.full_mask = None
        slots = torch.arange(kv_len, device=device)
        visible = None
        if not (fresh or single):
            if tree is None:
                visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
            else:
                visible = (slots[None, None, :] < base[:, None, None]).expand(B, T, kv_len).clone()
                rows = torch.arange(B, device=device)[:, None]
                visible[rows, :, self.slots] = self.feed_mask.transpose(1, 2)
            self.full_mask = visible[:, None]
        self.sliding_causal, self.sliding_mask = self.full_causal, self.full_mask
        window = self.window
        if window is not None and not ((single and kv_len <= window) or (fresh and T <= window)):
            if visible is None:
                visible = slots[None, None, :] <= positions[:, :, None]
            slot_pos = slots[None].expand(B, -1)
            if tree is not None:
                slot_pos = slot_pos.clone()
                slot_pos[torch.arange(B, device=device)[:, None], self.slots] = positions
            in_window = slot_pos[:, None, :] > positions[:, :, None] - window
            self.sliding_causal, self.sliding_mask = False, (visible & in_window)[:, None]

    def exact_slots(self, row: int, sliding: bool) -> list[tuple[int, int, Tensor | None]]:
        """Per query of ``row``: its visible slots as a slice ``[lo, hi)``, or as the committed slots
        ``[lo, hi)`` plus the slots of its ancestors (an index tensor, by depth) when those are not
        contiguous (computed once per step and kind of layer)."""
        key = (row, sliding and self.window is not None)
        cached = self._exact_cache.get(key)
        if cached is None:
            device = self.positions.device
            cached = self._exact_cache[key] = [
                (lo, hi, None if anc is None else torch.tensor(anc, device=device))
                for lo, hi, anc in self.visible_slots(row, sliding)]
        return cached

    def visible_slots(self, row: int, sliding: bool) -> list[tuple[int, int, list[int] | None]]:
        """``exact_slots`` with the ancestors as host lists (for the native attention's arrays);
        a decode step only."""
        out = []
        window = self.window if sliding else None
        for t, pos in enumerate(self._positions[row]):
            lo = max(0, pos + 1 - window) if window else 0
            if self._feed is None:
                out.append((lo, pos + 1, None))
                continue
            base = self.tree_base[row]
            seen = [j for j, v in enumerate(self._feed[row][t]) if v
                    and (window is None or self._positions[row][j] > pos - window)]
            if seen == list(range(seen[0], t + 1)):  # a chain-like run of slots: slice, no copy
                # the root is visible exactly when no committed slot is cut by the window (lo <= base)
                out.append((lo if seen[0] == 0 else base + seen[0], base + t + 1, None))
            else:
                out.append((lo, base, [base + j for j in seen]))
        return out


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
        self.compiled = None  # a CompiledStep running decode-sized passes (see compile())
        self.reset_rotary(rope_freq_factors)

    def compile(self, warm_up: bool = True, native: bool | None = None) -> float:
        """Run decode and verify passes through ``torch.compile`` from now on (``models/compiled.py``);
        compiles at once unless ``warm_up=False``. Returns the compile time in seconds (0 if already).
        ``native``: attention and int8 GEMMs through the C++ ops of ``leaplm.native`` (default: when
        they build, on CPU in float32); False: the Python custom ops (slower; the same computation, rounded differently)."""
        from .compiled import CompiledStep

        if self.compiled is None:
            self.compiled = CompiledStep(self, native)
        return self.compiled.warm_up() if warm_up else 0.0

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
        tree: tuple[list[int], Tensor] | None = None,
    ) -> Tensor:
        """tokens, positions ``[B, T]`` -> logits ``[B, K, vocab]`` (float32).

        ``kv_len``: 1 + the largest position in ``positions`` (pass it to avoid a device sync).
        ``contiguous_start``: every row's positions are ``start .. start+T-1`` (fast cache write).
        ``tree``: ``(base [B] host ints, feed_mask [B, T, T] bool)`` for token-tree verification.
        """
        cfg = self.config
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        step = _Step(positions, cfg, kv_len, contiguous_start, exact=self.exact, tree=tree)
        if self.compiled is not None and step.decode and logit_index is None:
            return self.compiled.run(tokens, positions, cache, step)
        return self.layers_forward(tokens, positions, cache, step, logit_index)

    @torch.inference_mode()
    def forward_paged(self, tokens: Tensor, positions: Tensor, pool, step, logit_index: Tensor | None = None,
                      compiled: bool = False, hidden_index: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """One flat pass of many sequences over a paged KV pool (``leaplm/engine``): ``tokens``, ``positions``
        ``[N]``, ``step`` a ``models.paged.PagedStep`` -> logits ``[K, vocab]`` float32 of the tokens
        ``logit_index [K]`` (default: all N). ``compiled``: through the compiled step (every token's logits).
        ``hidden_index [M]``: also return the final hidden states (after the last norm) of those tokens,
        ``(logits, hidden [M, hidden_size])``."""
        if compiled and self.compiled is not None:
            logits = self.compiled.run_paged(tokens, positions, pool, step)[0]
            logits = logits if logit_index is None else logits[logit_index]
            if hidden_index is None:
                return logits
            return logits, self.compiled.last_hidden.reshape(-1, self.config.hidden_size)[hidden_index]
        from .compiled import _use_native

        if _use_native(self):
            step.bind(pool)
        try:
            index = None if logit_index is None else logit_index[None]
            out = self.layers_forward(tokens[None], positions[None], pool, step, index,
                                      None if hidden_index is None else hidden_index[None])
            return out[0] if hidden_index is None else (out[0][0], out[1][0])
        finally:
            step.unbind()

    def layers_forward(self, tokens: Tensor, positions: Tensor, cache: KVCache | None, step: _Step | None,
                       logit_index: Tensor | None, hidden_index: Tensor | None = None,
                       all_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embedding, blocks, norm and LM head -> logits ``[B, K, vocab]`` float32; ``cache=None``: the
        compiled step (attention through ``leaplm::attend`` on the active step). ``hidden_index [B, M]``: also the
        final hidden states (after the last norm) of those tokens, ``(logits, hidden [B, M, hidden])``;
        ``all_hidden``: of every token (``[B, T, hidden]``, the compiled step's second output)."""
        cfg = self.config
        x = F.embedding(tokens, self.embed)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        ropes = {name: rot(positions, x.dtype) for name, rot in self.rotary.items()}
        ropes.setdefault("sliding", ropes["full"])
        for block in self.blocks:
            x = block(x, ropes, cache, step)
        hidden = None
        if hidden_index is not None:
            hidden = self.norm(torch.gather(x, 1, hidden_index[:, :, None].expand(-1, -1, x.shape[-1])))
        if logit_index is not None:
            x = torch.gather(x, 1, logit_index[:, :, None].expand(-1, -1, x.shape[-1]))
            if x.shape[1] == 0:   # a pass that only fills the cache (a prefill chunk)
                logits = x.new_zeros(x.shape[0], 0, cfg.vocab_size, dtype=torch.float32)
                return logits if hidden is None else (logits, hidden)
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else linear(x, self.embed)
        if all_hidden:
            return logits.float(), x
        return logits.float() if hidden is None else (logits.float(), hidden)

    # ------------------------------------------------------------------ weights
    def load_weights(self, tensors: Mapping[str, Tensor], dtype: torch.dtype, device,
                     loaded_block: Callable[[nn.Module], None] | None = None) -> None:
        """Load Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...).

        Every source arrives in Hugging Face convention (the GGUF loader undoes llama.cpp's
        changes); ``config.norm_offset`` is added to norm weights here (gemma's ``1 + w``).
        A mapping with ``pop`` (a dict, ``load.LazyTensors``) is consumed: each tensor is popped as it is
        assigned, so the caller's copy is freed as loading goes. ``loaded_block(block)`` runs after each
        block is loaded (``build_model`` quantizes it there, before the next block is read).
        """
        cfg = self.config
        consume = hasattr(tensors, "pop")

        def get(name: str) -> Tensor:
            if name not in tensors:
                raise CorruptModelError(f"checkpoint lacks tensor {name!r}")
            return tensors.pop(name) if consume else tensors[name]

        def take(name: str) -> Tensor:
            return get(name).to(device=device, dtype=dtype)

        def norm(module: RMSNorm, name: str) -> None:
            w = get(name)
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
            if loaded_block is not None:
                loaded_block(block)
        norm(self.norm, "model.norm.weight")
        if self.lm_head is not None:
            self.lm_head.weight = param(take("lm_head.weight"))
        self.rotary.to(device)
