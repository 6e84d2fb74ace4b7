"""Self-distillation data for trained drafters: the target answers training prompts, its features are kept.

``collect(engine, prompts, folder, max_tokens)`` runs the prompts through an ``LLMEngine`` (``LLM(...).engine``;
continuous batching, greedy; make it with prefix caching off so that every prompt token's feature is computed) with
a recording drafter (contract v2,
``needs_hidden``: it never drafts, it only receives the final hidden states of every committed token), and appends
each finished sequence to ``folder``:

- ``tokens.bin``   int32 ``[N]``: prompt + answer tokens of every sequence, back to back;
- ``features.bin`` float16 ``[N, H]``: the target's final hidden state (after its last norm) of each token; the
  last token of a sequence (sampled, never fed) has none: zeros;
- ``sequences.json``: ``{"hidden_size", "model", "sequences": [[start, prompt_len, length], ...], ...}``.

``Dataset(folder)`` reads them memory-mapped. Greedy answers make the data exact for greedy drafting: after an
answer token ``x_j`` the target's choice is ``x_{j+1}``, so the answer tokens are the labels.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InvalidParamsError
from ..speculative.drafters.base import Draft, Drafter

META = "sequences.json"


class _Recorder(Drafter):
    """Drafts nothing; keeps every committed token's final hidden state by request and position."""

    name = "recorder"
    needs_hidden = True
    num_draft = 1

    def __init__(self) -> None:
        self.features: dict[int, dict[int, torch.Tensor]] = {}

    def propose(self, row, context, k) -> Draft:
        return Draft([])

    def committed(self, row, tokens, hidden=None, start=None) -> None:
        if hidden is not None and start is not None:
            self.features.setdefault(row, {})[start] = hidden.to(torch.float16)

    def take(self, row: int, length: int, hidden_size: int) -> np.ndarray:
        out = np.zeros((length, hidden_size), dtype=np.float16)
        for start, h in self.features.pop(row, {}).items():
            n = min(len(h), length - start)
            out[start: start + n] = h[:n].numpy()
        return out


def collect(engine, prompts: Sequence[list[int]], folder: str | Path, max_tokens: int = 256, model: str = "",
            progress: Callable[[int, int], None] | None = None, chunk: int = 64) -> dict:
    """Answer ``prompts`` (token ids) greedily with ``engine`` (an ``LLMEngine``) and append the sequences to
    ``folder`` (created or extended); ``model`` names the target in the metadata. Returns the metadata written."""
    from ..sampling import SamplingParams

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    H = engine.config.hidden_size
    meta = read_meta(folder) if (folder / META).exists() else {
        "model": model, "hidden_size": H, "vocab_size": engine.config.vocab_size, "max_tokens": max_tokens,
        "sequences": [], "seconds": 0.0}
    if meta["hidden_size"] != H:
        raise InvalidParamsError(f"{folder} holds features of width {meta['hidden_size']}, not this model's {H}: "
                                 "use another --data folder")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    recorder = _Recorder()
    started = time.perf_counter()
    done = 0
    offset = sum(length for _, _, length in meta["sequences"])
    with open(folder / "tokens.bin", "ab") as tok_f, open(folder / "features.bin", "ab") as feat_f:
        for lo in range(0, len(prompts), chunk):
            batch = prompts[lo: lo + chunk]
            rids = [engine.add_request(list(p), params, speculative=recorder) for p in batch]
            try:
                while engine.has_unfinished():
                    engine.step()
                for rid, prompt in zip(rids, batch):
                    r = engine.get_request(rid)
                    seq = list(prompt) + list(r.output_ids)
                    tok_f.write(np.asarray(seq, dtype=np.int32).tobytes())
                    feat_f.write(recorder.take(rid, len(seq), H).tobytes())
                    meta["sequences"].append([offset, len(prompt), len(seq)])
                    offset += len(seq)
            finally:
                for rid in rids:
                    engine.abort(rid)
                    engine.release(rid)
            done += len(batch)
            tok_f.flush()
            feat_f.flush()
            meta["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            (folder / META).write_text(json.dumps(meta) + "\n")
            if progress is not None:
                progress(done, len(prompts))
    return meta


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise InvalidParamsError(f"{folder} is not a training-data folder made by leaplm train-drafter ({e})") from None


class Dataset:
    """The sequences of a data folder, memory-mapped: ``tokens [N]`` int32, ``features [N, H]`` float16,
    ``sequences`` a list of ``(start, prompt_len, length)``."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.meta = read_meta(folder)
        self.hidden_size = int(self.meta["hidden_size"])
        self.sequences = [tuple(s) for s in self.meta["sequences"]]
        n = sum(length for _, _, length in self.sequences)
        if not n:
            raise InvalidParamsError(f"{folder} holds no sequences")
        self.tokens = np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r", shape=(n,))
        self.features = np.memmap(folder / "features.bin", dtype=np.float16, mode="r", shape=(n, self.hidden_size))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def answer_tokens(self) -> int:
        return sum(length - prompt for _, prompt, length in self.sequences)
