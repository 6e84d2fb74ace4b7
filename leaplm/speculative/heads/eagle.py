"""The EAGLE draft head: one decoder layer over the target's own features (Li et al. 2024, EAGLE-1/2/3).

At index ``j`` of a sequence the head reads ``f_j``, the target's final hidden state of token ``j`` (after its last
norm: what its LM head reads), and the embedding of the next token ``x_{j+1}``:

    u_j = fc([norm_f(f_j) ; norm_e(embed(x_{j+1}))])  [.., 2H] -> [.., H]   (EAGLE-3: both parts RMS-normed, since
                                                      the target's features are ~1000x larger than its embeddings)
    h_j = decoder_layer(u_j)                          the target's layer type: RMSNorm, rotary GQA attention over
                                                      the head's own keys/values of indices <= j, gated MLP
    g_j = out_norm(h_j)                               the predicted feature f_{j+1}
    logits_j = g_j @ W[draft_vocab].T                 the target's LM head rows of the draft vocabulary (frozen)

``g_j`` predicts ``f_{j+1}``, so ``logits_j`` predicts token ``x_{j+2}``; fed back as ``[g_j ; embed(token)]`` it
drafts the next token again (a chain, or a tree grown EAGLE-2 style by ``drafters/eagle.py``). The rotary position
of index ``j`` is ``j + 1``. The draft vocabulary (EAGLE-3's reduced vocabulary) holds the ``draft_vocab_size`` most
frequent next tokens of the training data: its LM head costs ``draft_vocab_size / vocab`` of the full one.

Saved as a folder: ``eagle.safetensors`` (the head's own weights and ``draft_vocab`` ``[Vd]`` int64) and
``config.json`` (``EagleConfig`` plus training metadata). The embedding and LM head rows are the target's, taken at
``bind`` (never saved): a head only works with the target it was trained on (``target`` in the config: vocab and
hidden sizes, and a fingerprint of the embedding, are checked).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InvalidParamsError
from ...models.layers import apply_rotary

CONFIG_FILE, WEIGHTS_FILE = "config.json", "eagle.safetensors"


@dataclass
class EagleConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool = False
    qk_norm: bool = False
    vocab_size: int = 0                 # the target's
    draft_vocab_size: int = 0
    target: dict = field(default_factory=dict)      # what the head was trained on (checked at bind)
    training: dict = field(default_factory=dict)    # how (steps, loss, accuracy, data, time)

    @classmethod
    def for_target(cls, cfg, draft_vocab_size: int, intermediate_size: int | None = None) -> "EagleConfig":
        """The target's layer geometry (``ModelConfig``), with an optional smaller MLP (a CPU budget)."""
        return cls(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, intermediate_size=intermediate_size or cfg.intermediate_size,
                   rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias, qk_norm=cfg.qk_norm,
                   vocab_size=cfg.vocab_size, draft_vocab_size=min(draft_vocab_size, cfg.vocab_size))


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x.float(), weight.shape, weight, eps)   # float32 also under bf16 autocast (training)


class EagleHead(nn.Module):
    """The head's trainable weights and its forward pieces. Shapes: ``H`` hidden, ``nh``/``kv`` query/key heads,
    ``D`` head dim, ``Vd`` draft vocabulary; token-major tensors ``[N, ...]`` (training adds a batch dim in front).
    ``embed [V, H]`` and ``lm [Vd, H]`` are the target's (buffers, frozen, not saved)."""

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        c = self.config = config
        H, I = c.hidden_size, c.intermediate_size
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.feature_norm = nn.Parameter(torch.ones(H))
        self.embed_norm = nn.Parameter(torch.ones(H))
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.attn_norm = nn.Parameter(torch.ones(H))
        self.qkv = nn.Linear(H, self.q_size + 2 * self.kv_size, bias=c.attention_bias)
        self.o = nn.Linear(self.q_size, H, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(H))
        self.gate_up = nn.Linear(H, 2 * I, bias=False)
        self.down = nn.Linear(I, H, bias=False)
        self.out_norm = nn.Parameter(torch.ones(H))
        self.q_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.register_buffer("draft_vocab", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.embed: Tensor | None = None
        self.lm: Tensor | None = None
        self.rotary = None

    # ------------------------------------------------------------------ the target's parts
    def attach(self, target) -> None:
        """Take the target's embedding, LM head rows of the draft vocabulary and rotary tables (a
        ``leaplm.models.transformer.Transformer``); checks that the head was trained for it."""
        cfg, c = target.config, self.config
        if (cfg.hidden_size, cfg.vocab_size) != (c.hidden_size, c.vocab_size):
            raise InvalidParamsError(f"this EAGLE head was trained for a target with hidden size {c.hidden_size} and "
                                     f"vocabulary {c.vocab_size}, not {cfg.hidden_size} and {cfg.vocab_size} "
                                     f"(trained on {c.target.get('model', '?')})")
        embed = target.embed.detach().float()
        want = c.target.get("embed_fingerprint")
        if want is not None and abs(embed_fingerprint(embed) - want) > 1e-3 * max(1.0, abs(want)):
            raise InvalidParamsError(f"this EAGLE head was trained on {c.target.get('model', '?')}, whose embedding "
                                     "differs from this model's: train one for this model (leaplm train-drafter)")
        self.embed = embed
        self.lm = lm_weight(target)[self.draft_vocab].float().contiguous()
        self.rotary = target.rotary["full"]

    # ------------------------------------------------------------------ forward pieces
    def inputs(self, features: Tensor, next_tokens: Tensor) -> Tensor:
        """``[.., H]`` features and ``[..]`` next-token ids -> the layer's input ``[.., H]``."""
        eps = self.config.rms_norm_eps
        return self.fc(torch.cat((_rms(features, self.feature_norm, eps),
                                  _rms(F.embedding(next_tokens, self.embed), self.embed_norm, eps)), dim=-1))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[.., T, 1, D]`` for positions ``[.., T]``."""
        cos, sin = self.rotary(positions.reshape(1, -1), torch.float32)
        shape = (*positions.shape, 1, self.config.head_dim)
        return cos.reshape(shape), sin.reshape(shape)

    def project(self, u: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``u [.., T, H]`` -> q ``[.., T, nh, D]``, k, v ``[.., T, kv, D]`` (normed, rotated)."""
        c = self.config
        x = _rms(u, self.attn_norm, c.rms_norm_eps)
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.unflatten(-1, (c.num_heads, c.head_dim))
        k = k.unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = v.unflatten(-1, (c.num_kv_heads, c.head_dim))
        if self.q_norm is not None:
            q, k = _rms(q, self.q_norm, c.rms_norm_eps), _rms(k, self.k_norm, c.rms_norm_eps)
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q ``[N, nh, D]`` over k, v ``[S, kv, D]`` where ``mask [N, S]`` (bool, True = visible) -> ``[N, nh*D]``."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        keys, values = k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask[None],
                                             scale=c.head_dim ** -0.5)
        return out.transpose(0, 1).reshape(q.shape[0], self.q_size)

    def finish(self, u: Tensor, attn: Tensor) -> Tensor:
        """The layer's residual stream after attention ``attn [.., nh*D]`` -> predicted feature ``g [.., H]``."""
        c = self.config
        h = u + self.o(attn)
        gate, up = self.gate_up(_rms(h, self.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        h = h + self.down(F.silu(gate) * up)
        return _rms(h, self.out_norm, c.rms_norm_eps)

    def logits(self, g: Tensor) -> Tensor:
        """``g [.., H]`` -> draft-vocabulary logits ``[.., Vd]``."""
        return g @ self.lm.T

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps({"method": "eagle", **asdict(self.config)}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "EagleHead":
        """A head saved by ``save`` (safetensors only); ``InvalidParamsError`` naming what is missing or wrong."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise InvalidParamsError(f"{folder} is not an EAGLE head folder (it needs {CONFIG_FILE} and "
                                     f"{WEIGHTS_FILE}; make one with leaplm train-drafter --method eagle)")
        try:
            raw = json.loads((folder / CONFIG_FILE).read_text())
        except ValueError as e:
            raise InvalidParamsError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from None
        if raw.pop("method", "eagle") != "eagle":
            raise InvalidParamsError(f"{folder} holds a drafter of another method, not an EAGLE head")
        try:
            head = cls(EagleConfig(**raw))
            head.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except (TypeError, RuntimeError, OSError) as e:
            raise InvalidParamsError(f"{folder} holds a broken EAGLE head: {e}") from None
        return head


def lm_weight(target) -> Tensor:
    """The target's LM head as a float ``[V, H]`` matrix (the embedding when tied, dequantized when int8/int4)."""
    head = target.lm_head
    if head is None:
        return target.embed.detach()
    if hasattr(head, "dequantized_weight"):
        return head.dequantized_weight()
    return head.weight.detach()


def embed_fingerprint(embed: Tensor) -> float:
    """A number that tells one embedding table from another (a strided sample's sum of squares)."""
    sample = embed.reshape(-1)[:: max(1, embed.numel() // 65536)].double()
    return float((sample * sample).sum())
