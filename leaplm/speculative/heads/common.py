"""What the trained heads share: their folder format and the check that a head meets the target it was trained on.

A head folder holds ``config.json`` (``{"method": ..., **config}``: the head's geometry, ``target`` (what it was
trained on: ``model``, ``embed_fingerprint``) and ``training`` (how)) and ``<method>.safetensors`` (the head's own
weights; the target's embedding and LM head rows are taken at ``bind``, never saved).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InvalidParamsError
from ...models.layers import apply_rotary

CONFIG_FILE = "config.json"
LABELS = {"eagle": "an EAGLE", "medusa": "a Medusa", "kangaroo": "a Kangaroo"}   # how messages name each method


def weights_file(method: str) -> str:
    return f"{method}.safetensors"


def check_target(method: str, config, target) -> None:
    """``InvalidParamsError`` unless ``target`` (a leaplm ``Transformer``) has the hidden size, vocabulary and
    embedding that the head (``config``: ``hidden_size``, ``vocab_size``, ``target``) was trained with."""
    cfg = target.config
    trained_on = config.target.get("model", "?")
    if (cfg.hidden_size, cfg.vocab_size) != (config.hidden_size, config.vocab_size):
        raise InvalidParamsError(f"this {method} head was trained for a target with hidden size {config.hidden_size} "
                                 f"and vocabulary {config.vocab_size}, not {cfg.hidden_size} and {cfg.vocab_size} "
                                 f"(trained on {trained_on})")
    want = config.target.get("embed_fingerprint")
    if want is not None and abs(embed_fingerprint(target.embed.detach().float()) - want) > 1e-3 * max(1.0, abs(want)):
        raise InvalidParamsError(f"this {method} head was trained on {trained_on}, whose embedding differs from this "
                                 "model's: train one for this model (leaplm train-drafter)")


def save_head(head: nn.Module, config, method: str, folder: str | Path) -> None:
    """Write ``head``'s state and ``config`` (a dataclass) into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / weights_file(method)))
    (folder / CONFIG_FILE).write_text(json.dumps({"method": method, **asdict(config)}, indent=2) + "\n")


def load_head(head_cls, config_cls, method: str, folder: str | Path):
    """A head saved by ``save_head`` (safetensors only); ``InvalidParamsError`` naming what is missing or wrong."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = weights_file(method)
    label = LABELS.get(method, f"a {method}")
    if not (folder / CONFIG_FILE).is_file() or not (folder / weights).is_file():
        other = read_method(folder)
        extra = f" (it holds {LABELS.get(other, other)} head)" if other and other != method else ""
        raise InvalidParamsError(f"{folder} is not {label} head folder{extra}: it needs {CONFIG_FILE} and {weights}; "
                                 f"make one with leaplm train-drafter --method {method}")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:
        raise InvalidParamsError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from None
    found = raw.pop("method", method)
    if found != method:
        raise InvalidParamsError(f"{folder} holds {LABELS.get(found, found)} head, not {label} head")
    try:
        head = head_cls(config_cls(**raw))
        head.load_state_dict(load_file(str(folder / weights)))
    except (TypeError, RuntimeError, OSError) as e:
        raise InvalidParamsError(f"{folder} holds {label} head that does not load: {e}") from None
    return head


def read_method(folder: str | Path) -> str | None:
    """The ``method`` a head folder's config names, or None."""
    try:
        return json.loads((Path(folder) / CONFIG_FILE).read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


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


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x.float(), weight.shape, weight, eps)   # float32 also under bf16 autocast (training)


class AttentionHead(nn.Module):
    """A head with one rotary GQA attention layer of the target's geometry (EAGLE's decoder layer, Kangaroo's
    adapter). Subclasses set ``config`` (``num_heads``, ``num_kv_heads``, ``head_dim``, ``rms_norm_eps``,
    ``attention_bias``, ``qk_norm``, ``hidden_size``) and call ``init_attention``; ``rotary`` is the target's,
    taken at ``attach``. Shapes: token-major ``[.., T, ...]``."""

    def init_attention(self) -> None:
        c = self.config
        H = c.hidden_size
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.attn_norm = nn.Parameter(torch.ones(H))
        self.qkv = nn.Linear(H, self.q_size + 2 * self.kv_size, bias=c.attention_bias)
        self.o = nn.Linear(self.q_size, H, bias=False)
        self.q_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.rotary = None

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[.., T, 1, D]`` for positions ``[.., T]``."""
        cos, sin = self.rotary(positions.reshape(1, -1), torch.float32)
        shape = (*positions.shape, 1, self.config.head_dim)
        return cos.reshape(shape), sin.reshape(shape)

    def project(self, u: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``u [.., T, H]`` -> q ``[.., T, nh, D]``, k, v ``[.., T, kv, D]`` (normed, rotated)."""
        c = self.config
        x = rms(u, self.attn_norm, c.rms_norm_eps)
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.unflatten(-1, (c.num_heads, c.head_dim))
        k = k.unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = v.unflatten(-1, (c.num_kv_heads, c.head_dim))
        if self.q_norm is not None:
            q, k = rms(q, self.q_norm, c.rms_norm_eps), rms(k, self.k_norm, c.rms_norm_eps)
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

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor, key_ok: Tensor) -> Tensor:
        """Training: q ``[B, T, nh, D]`` over k, v ``[B, T, kv, D]`` causally, keys where ``key_ok [B, T]`` ->
        ``[B, T, nh*D]``."""
        c = self.config
        B, T = q.shape[:2]
        group = c.num_heads // c.num_kv_heads
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & key_ok[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
                                             v.repeat_interleave(group, 2).transpose(1, 2), attn_mask=mask,
                                             scale=c.head_dim ** -0.5)
        return out.transpose(1, 2).nan_to_num(0.0).reshape(B, T, self.q_size)
