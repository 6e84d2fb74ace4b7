"""What every draft-head trainer shares: the configuration, training windows over self-distilled data, the draft
vocabulary, and the optimisation loop with its time budget, resumable state and curves.

``fit(head, cfg, out, sample, losses, eval_batch)`` runs AdamW with warm-up and cosine decay (over the steps, or over
the time budget when that ends the run first) until ``max_steps`` or ``max_minutes``, with the matmuls in bf16
autocast where the CPU has bf16 (1.9x faster on Zen 4; weights, optimizer and evaluation stay float32). Every
``eval_every`` steps it measures top-1 accuracy by draft depth on held-out windows (``acc[s]``: a depth-``s+1`` draft
token matches the target's). It saves a resumable state (``train_state.safetensors`` + ``train_state.json``, no
pickle) every two minutes and at the end, and ``plot`` draws ``training.png`` (loss and accuracy curves).
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

from ..errors import InvalidParamsError
from .distill import Dataset

STATE_JSON, STATE_TENSORS, PLOT = "train_state.json", "train_state.safetensors", "training.png"


@dataclass
class TrainConfig:
    draft_vocab: int = 8192
    intermediate_size: int | None = None     # eagle: the head's MLP width (None: the target's)
    unroll: int = 3                          # eagle: training-time-test steps
    heads: int = 4                           # medusa: heads (draft depth)
    layers: int = 1                          # medusa: residual blocks per head
    seq_len: int = 256
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 50
    max_steps: int = 2000
    max_minutes: float | None = None
    feature_weight: float = 0.2              # eagle: weight of the feature regression
    eval_every: int = 100
    eval_sequences: int = 16
    seed: int = 0
    precision: str = "auto"                  # "bf16": matmuls under bf16 autocast; "auto": bf16 where the CPU has it

    def use_bf16(self) -> bool:
        if self.precision == "auto":
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())   # AVX512-BF16 / AMX; else emulated, slower
        return self.precision == "bf16"

    def check(self) -> None:
        for name in ("draft_vocab", "unroll", "heads", "layers", "seq_len", "batch", "max_steps", "eval_every"):
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


def vocab_index(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[V]``: each target token's row in the draft vocabulary ``vocab``, -1 where it has none."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    return index


def expected_accepted(acc: list[float]) -> float:
    """Tokens per pass a chain of ``len(acc)`` drafts would give if depth ``s`` is accepted with ``acc[s]`` given the
    earlier ones were: ``1 + acc0 + acc0*acc1 + ...`` (the verification's own token included)."""
    total, p = 1.0, 1.0
    for a in acc:
        p *= a
        total += p
    return total


def prepare(target, data: Dataset, cfg: TrainConfig, out: str | Path,
            features: bool = True) -> tuple[Path, torch.Tensor, dict]:
    """What every trainer does first: check ``cfg`` (and, when the method reads the data's ``features``, that they
    are the target's width), create ``out``, seed torch, pick the draft vocabulary. Returns (``out``, the draft
    vocabulary ``[Vd]``, the head config's ``target`` record: the data's model and the embedding fingerprint)."""
    from ..speculative.heads.common import embed_fingerprint

    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if features:
        check_data(target, data)
    torch.manual_seed(cfg.seed)
    vocab = draft_vocabulary(data, cfg.draft_vocab, target.config.vocab_size)
    return out, vocab, {"model": data.meta.get("model"), "embed_fingerprint": embed_fingerprint(target.embed.float())}


def check_data(target, data: Dataset) -> None:
    """The data's features must be the target's hidden size (data made with another model are refused)."""
    if data.hidden_size != target.config.hidden_size:
        raise InvalidParamsError(f"the data's features are {data.hidden_size} wide, the model's "
                                 f"{target.config.hidden_size}: the data was made with another model")


def split(data: Dataset, cfg: TrainConfig) -> tuple[list, list]:
    """(training sequences, held-out sequences): a seeded permutation; 1 in 10 held out, at most ``eval_sequences``."""
    order = np.random.default_rng(cfg.seed).permutation(len(data.sequences))
    if len(order) < 2:
        raise InvalidParamsError("training needs at least 2 sequences (one is held out for evaluation)")
    held = max(1, min(cfg.eval_sequences, len(order) // 10))
    return [data.sequences[i] for i in order[held:]], [data.sequences[i] for i in order[:held]]


class Windows:
    """Training windows as tensors: features ``[B, T+U, H]``, tokens ``[B, T+U+1]``, masks; ``U = extra`` indices
    past the window give the labels of the deepest draft step."""

    def __init__(self, data: Dataset, sequences: list[tuple[int, int, int]], cfg: TrainConfig,
                 vocab_index: torch.Tensor, extra: int) -> None:
        self.data, self.sequences, self.cfg, self.vocab_index, self.extra = data, sequences, cfg, vocab_index, extra
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
        T, U, H = self.cfg.seq_len, self.extra, self.data.hidden_size
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


Losses = Callable[[dict], "tuple[torch.Tensor, list[tuple[int, int]]]"]


def fit(head: torch.nn.Module, cfg: TrainConfig, out: Path, sample: Callable[[np.random.Generator], dict],
        losses: Losses, eval_batch: dict, depth: int, resume: bool = True,
        progress: Callable[[dict], None] | None = None) -> tuple[int, History, list[float], str]:
    """Train ``head``'s parameters on batches from ``sample(rng)`` against ``losses(batch) -> (loss, [(right,
    predicted)] by depth)`` (``depth`` entries); returns (step, history, held-out accuracy by depth, what stopped it:
    "steps" or "time")."""
    rng = np.random.default_rng(cfg.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    history = History()
    step = 0
    if resume and (out / STATE_JSON).exists():
        step, history = _load_state(out, head, opt)
        rng = np.random.default_rng([cfg.seed, step])   # fresh draws, not the first steps' batches again

    def evaluate() -> list[float]:
        head.eval()
        with torch.no_grad():
            _, counts = losses(eval_batch)
        return [right / total if total else 0.0 for right, total in counts]

    started = time.perf_counter() - history.seconds
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
    last_save = time.perf_counter()
    acc = history.eval_acc[-1] if history.eval_acc else [0.0] * depth
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
        warmup = min(cfg.warmup, max(1, cfg.max_steps // 10))   # a short run is not all warm-up
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in opt.param_groups:
            group["lr"] = max(lr, cfg.lr * 0.02)
        batch = sample(rng)
        head.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, counts = losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        step += 1
        history.steps.append(step)
        history.loss.append(float(loss.detach()))
        history.tokens += counts[0][1] if counts else 0
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = evaluate()
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
        acc = evaluate()
        history.eval_steps.append(step)
        history.eval_acc.append(acc)
    _save_state(out, head, opt, step, history, cfg)
    plot(history, out / PLOT)
    return step, history, acc, stopped


def train_head(head, data: Dataset, states, sequences: tuple[list, list], index: torch.Tensor, extra: int,
               losses: Losses, depth: int, cfg: TrainConfig, out: Path, resume: bool = True,
               progress: Callable[[dict], None] | None = None, **record) -> dict:
    """Train ``head`` (with ``fit``) on windows of ``states`` (``tokens``, ``features``, ``hidden_size``: the data
    itself or states derived from it) over (training, held-out) ``sequences``, then save it with its training
    summary (plus ``record``) in ``config.training``; returns that summary."""
    train_windows = Windows(states, sequences[0], cfg, index, extra)
    eval_windows = Windows(states, sequences[1], cfg, index, extra)
    eval_batch = eval_windows.batch(eval_windows.sample(np.random.default_rng(cfg.seed + 1), 2 * cfg.batch))
    step, history, acc, stopped = fit(head, cfg, out, lambda rng: train_windows.batch(train_windows.sample(rng, cfg.batch)),
                                      losses, eval_batch, depth, resume, progress)
    head.config.training = {**summary(step, history, acc, stopped, data, cfg), **record}
    head.save(out)
    return head.config.training


def summary(step: int, history: History, acc: list[float], stopped: str, data: Dataset, cfg: TrainConfig) -> dict:
    """The training record saved in the head's config.json and printed by the CLI."""
    return {"steps": step, "stopped_by": stopped, "seconds": round(history.seconds, 1),
            "tokens_seen": history.tokens, "data_tokens": data.num_tokens, "data_sequences": len(data.sequences),
            "answer_tokens": data.answer_tokens(), "eval_acc_by_depth": [round(a, 4) for a in acc],
            "expected_tokens_per_pass_chain": round(expected_accepted(acc), 3),
            "final_loss": round(float(np.mean(history.loss[-20:])), 4) if history.loss else None,
            "config": cfg.__dict__}


def _save_state(out: Path, head: torch.nn.Module, opt, step: int, history: History, cfg: TrainConfig) -> None:
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


def _load_state(out: Path, head: torch.nn.Module, opt) -> tuple[int, History]:
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
