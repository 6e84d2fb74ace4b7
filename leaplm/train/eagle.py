"""Training an EAGLE head on self-distilled data (``distill.py``), on the CPU, with training-time test.

Windows of ``seq_len`` indices are cut from the data's sequences. **Step 0** is EAGLE-1's teacher-forced pass:
index ``j`` reads the target's feature ``f_j`` and token ``x_{j+1}`` and predicts ``f_{j+1}`` (SmoothL1, weight
``feature_weight``) and token ``x_{j+2}`` (cross-entropy over the draft vocabulary). **Steps 1..unroll-1**
(EAGLE-3's training-time test) feed the head its own prediction instead of the target's feature, as drafting
does: at step ``s`` anchor ``j`` reads ``[g^{s-1}_j ; embed(x_{j+1+s})]`` at position ``j + 1 + s`` and attends to
the real keys of indices ``<= j`` plus its own chain's keys of steps ``1..s`` (the diagonal), exactly the view a
depth-``s`` draft node has of the head's cache. Step ``s``'s losses are weighted ``0.8 ** s``. Only tokens of the
target's answers are predicted (the prompt's tokens are the user's, not the target's).

``train_eagle(...)`` runs AdamW with warm-up and cosine decay (over the steps, or over the time budget when that ends
the run first) until ``max_steps`` or ``max_minutes``, evaluates
top-1 accuracy per step on held-out sequences (matmuls in bf16 autocast where the CPU has bf16: 1.9x faster on
Zen 4; weights, optimizer and evaluation stay float32) (``acc[s]``: a depth-``s+1`` draft token matches the target, given
the earlier ones did), saves the head (``EagleHead.save``), a resumable state (``train_state.safetensors`` +
``train_state.json``, no pickle) and ``training.png`` (loss and accuracy curves).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidParamsError
from ..speculative.heads.eagle import EagleConfig, EagleHead, embed_fingerprint
from .distill import Dataset

STATE_JSON, STATE_TENSORS, PLOT = "train_state.json", "train_state.safetensors", "training.png"


@dataclass
class TrainConfig:
    draft_vocab: int = 8192
    intermediate_size: int | None = None     # None: the target's
    unroll: int = 3
    seq_len: int = 256
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 50
    max_steps: int = 2000
    max_minutes: float | None = None
    feature_weight: float = 0.2
    eval_every: int = 100
    eval_sequences: int = 16
    seed: int = 0
    precision: str = "auto"                  # "bf16": matmuls under bf16 autocast; "auto": bf16 where the CPU has it

    def use_bf16(self) -> bool:
        if self.precision == "auto":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())   # AVX512-BF16 / AMX; else emulated, slower
        return self.precision == "bf16"

    def check(self) -> None:
        for name in ("draft_vocab", "unroll", "seq_len", "batch", "max_steps", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParamsError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise InvalidParamsError(f"lr must be > 0, got {self.lr!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InvalidParamsError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InvalidParamsError(f"max_minutes must be > 0, got {self.max_minutes!r}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_acc: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def draft_vocabulary(data: Dataset, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent answer tokens of ``data`` (EAGLE-3's reduced vocabulary), most frequent first."""
    answers = [np.asarray(data.tokens[start + prompt: start + length], dtype=np.int64)
               for start, prompt, length in data.sequences]
    counts = np.bincount(np.concatenate(answers), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")[: min(size, vocab_size)]
    return torch.from_numpy(order.copy())


def expected_accepted(acc: list[float]) -> float:
    """Tokens per pass a chain of ``len(acc)`` drafts would give if depth ``s`` is accepted with ``acc[s]`` given the
    earlier ones were: ``1 + acc0 + acc0*acc1 + ...`` (the verification's own token included)."""
    total, p = 1.0, 1.0
    for a in acc:
        p *= a
        total += p
    return total


class _Windows:
    """Training windows as tensors: features ``[B, T+U, H]``, tokens ``[B, T+U+1]``, masks."""

    def __init__(self, data: Dataset, sequences: list[tuple[int, int, int]], cfg: TrainConfig,
                 vocab_index: torch.Tensor) -> None:
        self.data, self.sequences, self.cfg, self.vocab_index = data, sequences, cfg, vocab_index
        lengths = np.array([length for _, _, length in sequences], dtype=np.float64)
        self.weights = lengths / lengths.sum()

    def sample(self, rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
        """(sequence index, window start) pairs, sequences drawn by length."""
        out = []
        for s in rng.choice(len(self.sequences), size=count, p=self.weights):
            _, prompt, length = self.sequences[s]
            lo = max(0, prompt - self.cfg.seq_len // 2)           # windows reach into the answer
            hi = max(lo, length - 2 - self.cfg.seq_len // 2)
            out.append((int(s), int(rng.integers(lo, hi + 1))))
        return out

    def batch(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        T, U, H = self.cfg.seq_len, self.cfg.unroll, self.data.hidden_size
        feats = np.zeros((len(picks), T + U, H), dtype=np.float32)
        tokens = np.zeros((len(picks), T + U + 1), dtype=np.int64)
        known = np.zeros((len(picks), T + U), dtype=bool)          # index has a feature
        answer = np.zeros((len(picks), T + U + 1), dtype=bool)     # token is the target's
        for b, (s, w) in enumerate(picks):
            start, prompt, length = self.sequences[s]
            n = min(T + U + 1, length - w)
            tokens[b, :n] = self.data.tokens[start + w: start + w + n]
            nf = min(T + U, length - 1 - w)                        # the sequence's last token has no feature
            feats[b, :nf] = self.data.features[start + w: start + w + nf]
            known[b, :nf] = True
            answer[b, max(0, prompt - w): n] = True
        tokens_t = torch.from_numpy(tokens)
        label_ok = torch.from_numpy(answer) & (self.vocab_index[tokens_t] >= 0)
        return {"feats": torch.from_numpy(feats), "tokens": tokens_t, "known": torch.from_numpy(known),
                "label_ok": label_ok, "labels": self.vocab_index[tokens_t].clamp(min=0)}


def _ttt_attention(head: EagleHead, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                   key_ok: torch.Tensor) -> torch.Tensor:
    """q ``[B, T, nh, D]``; ``keys[0]``/``values[0]`` ``[B, T, kv, D]`` the real (step-0) ones, seen causally where
    ``key_ok [B, T]``; ``keys[t]`` (t >= 1) the same anchor's step-t keys, seen on the diagonal -> ``[B, T, nh*D]``."""
    c = head.config
    group = c.num_heads // c.num_kv_heads
    B, T = q.shape[:2]
    scale = c.head_dim ** -0.5
    expand = [k.repeat_interleave(group, 2) for k in keys]
    vexp = [v.repeat_interleave(group, 2) for v in values]
    real = torch.einsum("bqhd,bkhd->bhqk", q, expand[0]) * scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = real.masked_fill(~(causal[None, None] & key_ok[:, None, None, :]), float("-inf"))
    diag = [torch.einsum("bqhd,bqhd->bhq", q, k)[..., None] * scale for k in expand[1:]]
    probs = torch.softmax(torch.cat([real, *diag], dim=-1), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs[..., :T], vexp[0])
    for t, v in enumerate(vexp[1:]):
        out = out + probs[..., T + t].permute(0, 2, 1)[..., None] * v
    return out.reshape(B, T, head.q_size)


def losses(head: EagleHead, batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The training loss of a batch and, per unroll step, (correct top-1 predictions, predictions)."""
    T = cfg.seq_len
    feats, tokens, known = batch["feats"], batch["tokens"], batch["known"]
    positions = torch.arange(T)[None].expand(feats.shape[0], -1)
    keys, values = [], []
    g = feats[:, :T]
    total = feats.new_zeros(())
    counts = []
    for s in range(cfg.unroll):
        u = head.inputs(g, tokens[:, 1 + s: T + 1 + s])
        cos, sin = head.rope(positions + 1 + s)
        q, k, v = head.project(u, (cos, sin))
        keys.append(k)
        values.append(v)
        g = head.finish(u, _ttt_attention(head, q, keys, values, known[:, :T]))
        logits = head.logits(g)                                            # [B, T, Vd]
        ok = known[:, :T] & batch["label_ok"][:, 2 + s: T + 2 + s]
        target = batch["labels"][:, 2 + s: T + 2 + s]
        weight = 0.8 ** s
        if ok.any():
            ce = F.cross_entropy(logits[ok], target[ok])
            feat_ok = ok & known[:, 1 + s: T + 1 + s]
            reg = F.smooth_l1_loss(g[feat_ok], feats[:, 1 + s: T + 1 + s][feat_ok]) if feat_ok.any() else 0.0
            total = total + weight * (ce + cfg.feature_weight * reg)
            counts.append((int((logits[ok].argmax(-1) == target[ok]).sum()), int(ok.sum())))
        else:
            counts.append((0, 0))
    return total, counts


def train_eagle(target, data: Dataset, out: str | Path, cfg: TrainConfig, resume: bool = True,
                progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) an EAGLE head for ``target`` (a leaplm ``Transformer``) on ``data``; returns a summary."""
    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data.hidden_size != target.config.hidden_size:
        raise InvalidParamsError(f"the data's features are {data.hidden_size} wide, the model's "
                                 f"{target.config.hidden_size}: the data was made with another model")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data.sequences))
    held = max(1, min(cfg.eval_sequences, len(order) // 10))
    if len(order) < 2:
        raise InvalidParamsError("training needs at least 2 sequences (one is held out for evaluation)")
    train_seqs = [data.sequences[i] for i in order[held:]]
    eval_seqs = [data.sequences[i] for i in order[:held]]

    vocab = draft_vocabulary(data, cfg.draft_vocab, target.config.vocab_size)
    head_cfg = EagleConfig.for_target(target.config, len(vocab), cfg.intermediate_size)
    head_cfg.target = {"model": data.meta.get("model"), "embed_fingerprint": embed_fingerprint(target.embed.float())}
    head = EagleHead(head_cfg)
    head.draft_vocab.copy_(vocab)
    head.attach(target)
    vocab_index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    vocab_index[vocab] = torch.arange(len(vocab))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    history = History()
    step = 0
    if resume and (out / STATE_JSON).exists():
        step, history = _load_state(out, head, opt)

    train_windows = _Windows(data, train_seqs, cfg, vocab_index)
    eval_windows = _Windows(data, eval_seqs, cfg, vocab_index)
    eval_batch = eval_windows.batch(eval_windows.sample(np.random.default_rng(cfg.seed + 1), 2 * cfg.batch))
    started = time.perf_counter() - history.seconds
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
    last_save = time.perf_counter()
    acc = history.eval_acc[-1] if history.eval_acc else [0.0] * cfg.unroll
    stopped = "steps"
    bf16 = cfg.use_bf16()
    while step < cfg.max_steps:
        if budget is not None and time.perf_counter() - started >= budget:
            stopped = "time"
            break
        # cosine decay over the run: by steps, or by time when a time budget ends it first
        done = step / cfg.max_steps
        if budget is not None:
            done = max(done, (time.perf_counter() - started) / budget)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in opt.param_groups:
            group["lr"] = max(lr, cfg.lr * 0.02)
        batch = train_windows.batch(train_windows.sample(rng, cfg.batch))
        head.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = losses(head, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        step += 1
        history.steps.append(step)
        history.loss.append(float(loss.detach()))
        history.tokens += int(batch["known"][:, : cfg.seq_len].sum())
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = evaluate(head, eval_batch, cfg)
            history.eval_steps.append(step)
            history.eval_acc.append(acc)
        history.seconds = time.perf_counter() - started
        if progress is not None:
            progress({"step": step, "max_steps": cfg.max_steps, "loss": history.loss[-1], "acc": acc,
                      "seconds": history.seconds})
        if time.perf_counter() - last_save > 120:
            _save_state(out, head, opt, step, history, cfg)
            last_save = time.perf_counter()
    if not history.eval_steps or history.eval_steps[-1] != step:
        acc = evaluate(head, eval_batch, cfg)
        history.eval_steps.append(step)
        history.eval_acc.append(acc)
    summary = {"steps": step, "stopped_by": stopped, "seconds": round(history.seconds, 1),
               "tokens_seen": history.tokens, "data_tokens": data.num_tokens, "data_sequences": len(data.sequences),
               "answer_tokens": data.answer_tokens(), "eval_acc_by_depth": [round(a, 4) for a in acc],
               "expected_tokens_per_pass_chain": round(expected_accepted(acc), 3),
               "final_loss": round(float(np.mean(history.loss[-20:])), 4) if history.loss else None,
               "config": cfg.__dict__}
    head.config.training = summary
    head.save(out)
    _save_state(out, head, opt, step, history, cfg)
    plot(history, out / PLOT)
    return summary


@torch.no_grad()
def evaluate(head: EagleHead, batch: dict, cfg: TrainConfig) -> list[float]:
    """Top-1 accuracy per unroll step on held-out windows."""
    head.eval()
    _, counts = losses(head, batch, cfg)
    return [right / total if total else 0.0 for right, total in counts]


def _save_state(out: Path, head: EagleHead, opt, step: int, history: History, cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    names = {id(p): n for n, p in head.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().contiguous().reshape(value.shape or (1,))
    save_file(tensors, str(out / STATE_TENSORS))
    (out / STATE_JSON).write_text(json.dumps({"step": step, "history": history.__dict__, "config": cfg.__dict__}) + "\n")


def _load_state(out: Path, head: EagleHead, opt) -> tuple[int, History]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((out / STATE_JSON).read_text())
        tensors = load_file(str(out / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise InvalidParamsError(f"cannot resume from {out}: {e} (start afresh with --no-resume)") from None
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, strict=False)
    for name, p in head.named_parameters():
        state = {key.rsplit(".", 1)[1]: v for key, v in tensors.items() if key.startswith(f"opt.{name}.")
                 and key.count(".") == name.count(".") + 2}
        if state:
            if "step" in state:
                state["step"] = state["step"].reshape(())
            opt.state[p] = state
    return int(meta["step"]), History(**meta["history"])


def plot(history: History, path: Path) -> None:
    """Loss per step (smoothed) and held-out accuracy per depth, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if history.loss:
        window = max(1, len(history.loss) // 50)
        smooth = np.convolve(history.loss, np.ones(window) / window, mode="valid")
        ax1.plot(history.steps[window - 1:], smooth)
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    if history.eval_acc:
        acc = np.array(history.eval_acc)
        for s in range(acc.shape[1]):
            ax2.plot(history.eval_steps, acc[:, s], marker="o", label=f"depth {s + 1}")
        ax2.legend()
    ax2.set(xlabel="step", ylabel="top-1 accuracy (held out)", title="draft accuracy by depth", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
