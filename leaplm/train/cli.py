"""``leaplm train-drafter``: self-distil data from the target, then train a draft head on it (CPU).

    leaplm train-drafter -m smollm2-135m-instruct --method eagle --out heads/smollm2-eagle --max-minutes 15
    leaplm train-drafter -m smollm2-135m-instruct --method medusa --out heads/smollm2-medusa --data heads/smollm2-eagle/data

1. **Data** (``--data``, default ``OUT/data``): ``--prompts`` held-out training prompts (``train/prompts.py``: no
   overlap with HumanEval or Spec-Bench) are answered greedily by the target (``--max-tokens`` each, continuous
   batching) and its features recorded (``train/distill.py``). An existing data folder is extended up to
   ``--prompts`` sequences, not redone.
2. **Training** (``train/eagle.py``, ``train/medusa.py``; ``train/loop.py``): until ``--steps`` or ``--max-minutes``; a progress bar shows loss and held-out
   accuracy by depth; the state is saved every two minutes and a rerun resumes it (``--no-resume``: start afresh).
3. The head, ``config.json`` (with the training summary) and ``training.png`` land in ``OUT``; use it with
   ``--spec eagle --draft-head OUT`` or ``LLM(model, speculative={"method": "eagle", "path": OUT})`` (``medusa``
   likewise).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..cli_common import info as _info

METHODS = ("eagle", "medusa", "kangaroo")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-drafter", help="train a draft head (EAGLE, Medusa, Kangaroo) for a model on its own answers, on this machine",
        description="Self-distil training data from the model (held-out prompts, greedy answers, its hidden states) "
                    "and train a draft head on it with torch on the CPU. See docs/trained-drafters.md.")
    p.add_argument("--model", "-m", default=None, help="the target: known name, .gguf file or HF folder "
                                                       "(default: smollm2-135m-instruct)")
    p.add_argument("--quantization", "-q", default="auto",
                   help="the target's weights while making data, as when serving (default auto: int8 for a GGUF)")
    p.add_argument("--method", default="eagle", choices=METHODS, help="the draft head to train (default eagle)")
    p.add_argument("--out", required=True, help="folder for the trained head (created)")
    p.add_argument("--data", default=None, help="training-data folder (default: OUT/data; reused and extended)")
    p.add_argument("--prompts", type=int, default=1500, help="training prompts to answer (default 1500)")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length per prompt (default 256)")
    p.add_argument("--steps", type=int, default=3000, help="most optimizer steps (default 3000)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary: the most frequent answer tokens (default 8192)")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="eagle: the head's MLP width (default: the target's)")
    p.add_argument("--unroll", type=int, default=3, help="eagle: training-time-test steps (default 3)")
    p.add_argument("--heads", type=int, default=4, help="medusa: heads, i.e. the draft depth (default 4)")
    p.add_argument("--layers", type=int, default=1, help="medusa: residual blocks per head (default 1)")
    p.add_argument("--exit-layer", type=int, default=2,
                   help="kangaroo: the self-draft is the model's first N layers plus the adapter (default 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="training matmuls: bf16 autocast (about 2x faster where the CPU has bf16 instructions), fp32, "
                        "or auto (bf16 when the CPU has them; default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-resume", action="store_true", help="start training afresh even if OUT holds a state")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import torch

    from ..cli_common import at_least
    from .loop import TrainConfig

    for flag, value in (("--prompts", args.prompts), ("--max-tokens", args.max_tokens), ("--steps", args.steps),
                        ("--draft-vocab", args.draft_vocab), ("--unroll", args.unroll), ("--seq-len", args.seq_len),
                        ("--batch", args.batch), ("--threads", args.threads), ("--heads", args.heads), ("--layers", args.layers),
                        ("--exit-layer", args.exit_layer),
                        ("--intermediate-size", args.intermediate_size)):
        at_least(flag, value, 1)
    cfg = TrainConfig(draft_vocab=args.draft_vocab, intermediate_size=args.intermediate_size, unroll=args.unroll,
                      heads=args.heads, layers=args.layers,
                      seq_len=args.seq_len, batch=args.batch, lr=args.lr, max_steps=args.steps,
                      max_minutes=args.max_minutes, precision=args.precision)
    cfg.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = Path(args.data) if args.data else out / "data"
    from ..llm import LLM
    from .distill import Dataset, collect, read_meta
    from .prompts import training_prompts

    started = time.perf_counter()
    _info(f"loading {args.model or 'smollm2-135m-instruct'}")
    llm = LLM(args.model, quantization=args.quantization, prefix_caching=False, max_num_seqs=32)
    have = len(read_meta(data_dir)["sequences"]) if (data_dir / "sequences.json").exists() else 0
    if have < args.prompts:
        prompts = training_prompts(args.prompts)[have:]
        ids = [llm.chat_prompt(p["messages"]) for p in prompts]
        _info(f"answering {len(ids)} training prompts ({args.max_tokens} tokens each) into {data_dir}")
        with _Bar("self-distillation", len(ids)) as bar:
            meta = collect(llm.engine, ids, data_dir, args.max_tokens, model=str(llm.model_path),
                           progress=lambda done, total: bar.update(done))
        _info(f"data: {len(meta['sequences'])} sequences in {meta['seconds']:.0f} s")
    data = Dataset(data_dir)
    what = {"eagle": "an EAGLE head", "medusa": f"{cfg.heads} Medusa heads",
            "kangaroo": f"a Kangaroo adapter after layer {args.exit_layer}"}[args.method]
    _info(f"training {what} on {data.num_tokens} tokens ({data.answer_tokens()} answer tokens) into {out}")
    if args.method == "eagle":
        from .eagle import train_eagle as train
    elif args.method == "medusa":
        from .medusa import train_medusa as train
    else:
        from functools import partial

        from .kangaroo import train_kangaroo

        train = partial(train_kangaroo, exit_layer=args.exit_layer)

    with _Bar("training", cfg.max_steps) as bar:
        def progress(state: dict) -> None:
            acc = "/".join(f"{a:.2f}" for a in state["acc"])
            bar.update(state["step"], f"loss {state['loss']:.3f} acc {acc}")

        summary = train(llm.model, data, out, cfg, resume=not args.no_resume, progress=progress)
    _info(f"trained in {summary['seconds']:.0f} s ({summary['steps']} steps, stopped by {summary['stopped_by']}): "
         f"held-out accuracy by depth {summary['eval_acc_by_depth']}, ~{summary['expected_tokens_per_pass_chain']} "
         f"tokens per pass as a chain{' (heads taken as independent)' if args.method == 'medusa' else ''}; total {time.perf_counter() - started:.0f} s")
    print(json.dumps({"out": str(out), **{k: v for k, v in summary.items() if k != "config"}}))
    _info(f"use it: leaplm generate --spec {args.method} --draft-head {out} ...")
    return 0


class _Bar:
    """A rich progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.progress, self.task, self.shown = what, total, None, None, -1

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True))
            self.progress.__enter__()
            self.task = self.progress.add_task(self.what, total=self.total, info="")
        return self

    def update(self, done: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=info)
        elif done * 10 // max(1, self.total) != self.shown:
            self.shown = done * 10 // max(1, self.total)
            _info(f"{self.what}: {done}/{self.total} {info}")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


__all__ = ["add_parser", "main"]
