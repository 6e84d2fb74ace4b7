"""Teacher-forced perplexity of leaplm's own ``Transformer``, optionally against a reference model.

    from leaplm.evals.perplexity import load_texts, perplexity, compare
    texts = load_texts(tokenizer, "spec_bench", limit=2)          # -> Texts(ids, num_bytes, ...)
    perplexity(model, texts.ids, max_len=512, reference=fp32_model, num_bytes=texts.num_bytes)
    compare({"float32": fp32, "int8": q8}, texts.ids, reference="float32")   # every model, one pass per window

Scoring (what the tests check):

* Each sequence ``ids[0..N-1]`` is cut into windows of at most ``max_len`` tokens (``windows``). The first
  window is ``[0, min(N, max_len))`` and scores tokens ``1 ..``; each next window scores the next ``stride``
  tokens (fewer at the end) and starts ``max_len`` tokens before its end, so every scored token past the
  first window sees at least ``max_len - stride`` tokens of context. Every token ``1 .. N-1`` is scored
  exactly once; token 0 is context only. A window is fed as a fresh sequence (positions ``0 .. T-1``),
  as Hugging Face's perplexity recipe does.
* ``nll_per_token`` = mean over all scored tokens of all sequences of ``-log p(token | window before it)``
  (natural log); ``perplexity = exp(nll_per_token)``; ``bits_per_byte = sum(nll) / ln 2 / num_bytes`` when
  the UTF-8 byte count of the scored text is known.
* ``top1_accuracy``: the model's argmax equals the actual next token. With a reference model:
  ``top1_agreement`` (the argmaxes agree) and ``kl_vs_reference`` (mean over scored tokens of
  KL(reference || model), nats), both on the same windows.

Text sources (``load_texts``): every text is scored as the continuation of one prefix token - the
tokenizer's BOS, else its EOS (lm-evaluation-harness's rule for rolling log-likelihoods) - so its first
token is scored too and ``num_bytes`` is the text's UTF-8 length.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidParamsError
from . import Progress

TEXT_SOURCES = ("spec_bench", "humaneval")
_CHUNK = 128       # scored positions per log-softmax chunk (bounds memory at [_CHUNK, vocab] floats)


# --------------------------------------------------------------------------- texts


@dataclass
class Texts:
    """Token sequences to score. ``source``: the file read; ``num_bytes``: UTF-8 bytes the scored tokens stand
    for (None when the input was token ids); ``names``: one id per sequence (sample id, file name)."""

    source: str
    ids: list[list[int]]
    names: list[str]
    num_bytes: int | None


def _prefix_id(tokenizer) -> int | None:
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    eos = getattr(tokenizer.hf, "eos_token_id", None)
    return int(eos) if eos is not None else (min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None)


def _encode_texts(tokenizer, source: str, names: list[str], texts: list[str]) -> Texts:
    if tokenizer is None:
        raise InvalidParamsError(f"--text {source!r}: the model has no tokenizer; give a .jsonl file of "
                                 "{\"prompt_ids\": [...]} rows instead")
    prefix = _prefix_id(tokenizer)
    ids, num_bytes = [], 0
    for text in texts:
        body = tokenizer.encode(text, add_special_tokens=False)
        if prefix is not None:
            ids.append([prefix] + body)
            num_bytes += len(text.encode("utf-8"))
        else:  # nothing to condition the first token on: it is context only
            ids.append(body)
            num_bytes += len(text.encode("utf-8")) - len(tokenizer.decode(body[:1]).encode("utf-8"))
    return Texts(source, ids, names, num_bytes)


def _jsonl_rows(path: Path, limit: int | None) -> tuple[list[str], list[str], list[list[int]]]:
    """A ``.jsonl`` file -> (names, texts, token-id rows); each row has ``text`` | ``prompt`` | ``turns``
    (joined by a blank line) | ``prompt_ids``. All rows must be of one kind (text or ids)."""
    from ..bench.workloads import read_jsonl

    names, texts, id_rows = [], [], []
    for n, row in enumerate(read_jsonl(path), 1):
        name = str(row.get("id", row.get("question_id", row.get("task_id", n - 1))))
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise InvalidParamsError(f"{path}:{n}: prompt_ids must be a list of non-negative integers")
            id_rows.append(list(ids))
        else:
            value = row.get("text", row.get("prompt", row.get("turns")))
            if isinstance(value, list) and all(isinstance(t, str) for t in value):
                value = "\n\n".join(value)
            if not isinstance(value, str):
                raise InvalidParamsError(f"{path}:{n}: a row needs \"text\" or \"prompt\" (string), \"turns\" "
                                         "(list of strings) or \"prompt_ids\" (list of token ids)")
            texts.append(value)
        names.append(name)
        if limit is not None and len(names) >= limit:
            break
    if texts and id_rows:
        raise InvalidParamsError(f"{path}: mixes text rows and prompt_ids rows; use one kind")
    return names, texts, id_rows


def check_text_spec(spec: str, limit: int | None = None) -> None:
    """The cheap checks of ``load_texts``' arguments (run before a slow model load): the limit, and that a
    file given by path exists."""
    if limit is not None and limit < 1:
        raise InvalidParamsError(f"--limit must be >= 1, got {limit}")
    if spec.partition(":")[0] not in TEXT_SOURCES and not Path(spec).expanduser().is_file():
        raise InvalidParamsError(f"--text {spec!r}: no such file; give {' | '.join(TEXT_SOURCES)}, "
                                 "spec_bench:PATH, humaneval:PATH, a .jsonl file or a text file")


def load_texts(tokenizer, spec: str, limit: int | None = None) -> Texts:
    """``spec`` -> token sequences to score (``tokenizer``: a ``leaplm.tokenizer.Tokenizer`` or None).

    * ``spec_bench`` / ``spec_bench:PATH`` - the Spec-Bench questions, a sample's turns joined by a blank
      line; ``limit``: the first ``limit`` samples of each of the 13 categories (as ``leaplm bench``).
    * ``humaneval`` / ``humaneval:PATH`` - each problem's prompt + canonical solution; the first ``limit``.
    * ``FILE.jsonl`` / ``.jsonl.gz`` - rows of ``text`` | ``prompt`` | ``turns`` | ``prompt_ids`` (ids are used
      as given: no prefix, no byte count); the first ``limit`` rows.
    * any other file - its whole content as one text (``limit`` does not apply).
    """
    check_text_spec(spec, limit)
    name, _, arg = spec.partition(":")
    if name == "spec_bench":
        from ..bench.workloads import load_workload

        workload = load_workload(spec, limit)
        texts = _encode_texts(tokenizer, workload.source, [f"{s.category}/{s.id}" for s in workload.samples],
                              ["\n\n".join(s.turns) for s in workload.samples])
    elif name == "humaneval":
        from ..bench.workloads import humaneval_path, read_jsonl

        path = Path(arg).expanduser() if arg else humaneval_path()
        rows = read_jsonl(path)[:limit]
        texts = _encode_texts(tokenizer, str(path), [str(r.get("task_id", i)) for i, r in enumerate(rows)],
                              [r.get("prompt", "") + r.get("canonical_solution", "") for r in rows])
    else:
        path = Path(spec).expanduser()
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            names, strings, id_rows = _jsonl_rows(path, limit)
            texts = (Texts(str(path), id_rows, names, None) if id_rows
                     else _encode_texts(tokenizer, str(path), names, strings))
        else:
            try:
                content = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InvalidParamsError(f"--text {spec!r}: cannot read it as UTF-8 text: {e}") from None
            texts = _encode_texts(tokenizer, str(path), [path.name], [content])
    if sum(max(0, len(s) - 1) for s in texts.ids) == 0:
        raise InvalidParamsError(f"--text {spec!r} holds no text to score (empty, or every text shorter than 2 tokens)")
    return texts


# --------------------------------------------------------------------------- windows


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a sequence of ``n`` tokens: ``(begin, end, score_from)`` triples; the window feeds
    tokens ``[begin, end)`` and scores tokens ``[score_from, end)`` (``begin < score_from``). See the module
    docstring; ``1 <= stride < max_len``."""
    if n < 2:
        return []
    out = [(0, min(n, max_len), 1)]
    while out[-1][1] < n:
        start = out[-1][1]
        end = min(n, start + stride)
        out.append((max(0, end - max_len), end, start))
    return out


def _check(models: Mapping[str, torch.nn.Module], token_seqs: Sequence[Sequence[int]], max_len: int,
           stride: int | None, reference: str | None) -> int:
    if not models:
        raise InvalidParamsError("no model to evaluate")
    if reference is not None and reference not in models:
        raise InvalidParamsError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    context = min(m.config.max_position_embeddings for m in models.values())
    if not 2 <= max_len <= context:
        raise InvalidParamsError(f"max_len must be in [2, {context}] (the models' context window), got {max_len}")
    stride = max_len // 2 if stride is None else stride
    if not 1 <= stride < max_len:
        raise InvalidParamsError(f"stride must be in [1, max_len - 1] = [1, {max_len - 1}], got {stride}")
    vocab = {m.config.vocab_size for m in models.values()}
    if len(vocab) > 1:
        raise InvalidParamsError(f"the models have different vocabularies ({sorted(vocab)}); they cannot be compared")
    if not token_seqs or sum(max(0, len(s) - 1) for s in token_seqs) == 0:
        raise InvalidParamsError("no tokens to score: give at least one sequence of 2 or more tokens")
    bad = next((t for s in token_seqs for t in s if not 0 <= t < min(vocab)), None)
    if bad is not None:
        raise InvalidParamsError(f"token id {bad} is outside the vocabulary [0, {min(vocab)})")
    return stride


# --------------------------------------------------------------------------- scoring


class _Tally:
    """Running sums of one model's scores (float64 on the host)."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.tokens = self.correct = self.agree = 0
        self.seconds = 0.0

    def add_chunk(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None) -> None:
        """``logp`` ``[K, V]`` log-probabilities predicting ``targets`` ``[K]``; ``ref_logp`` the reference's."""
        self.nll -= logp.gather(1, targets[:, None]).double().sum().item()
        top1 = logp.argmax(-1)
        self.correct += int((top1 == targets).sum())
        self.tokens += targets.shape[0]
        if ref_logp is not None:
            self.agree += int((top1 == ref_logp.argmax(-1)).sum())
            self.kl += (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum().item()

    def result(self, reference: str | None, num_bytes: int | None) -> dict:
        n = self.tokens
        nll = self.nll / n
        return {
            "perplexity": math.exp(nll) if nll < 700 else math.inf, "nll_per_token": nll, "tokens": n,
            "bits_per_byte": self.nll / math.log(2) / num_bytes if num_bytes else None, "bytes": num_bytes,
            "top1_accuracy": self.correct / n,
            "reference": reference,
            "top1_agreement": self.agree / n if reference is not None else None,
            "kl_vs_reference": self.kl / n if reference is not None else None,
            "seconds": self.seconds,
        }


def compare(models: Mapping[str, torch.nn.Module], token_seqs: Sequence[Sequence[int]], *, max_len: int = 512,
            stride: int | None = None, reference: str | None = None, num_bytes: int | None = None,
            progress: bool = False) -> dict[str, dict]:
    """Score every model of ``models`` (label -> ``Transformer``, one shared vocabulary) on the same windows.

    ``token_seqs``: lists of token ids, each scored on its own (see ``windows``). ``stride``: default
    ``max_len // 2``. ``reference``: the label of the model the others are compared with (its own entry has
    no agreement / KL). Returns label -> ``{perplexity, nll_per_token, tokens, bits_per_byte, bytes,
    top1_accuracy, reference, top1_agreement, kl_vs_reference, seconds, sequences, windows, max_len, stride}``.
    """
    stride = _check(models, token_seqs, max_len, stride, reference)
    plan = [(seq, w) for seq in token_seqs for w in windows(len(seq), max_len, stride)]
    order = ([reference] if reference is not None else []) + [k for k in models if k != reference]
    tallies = {label: _Tally() for label in order}
    caches: dict[str, object] = {}
    with Progress(len(plan), "perplexity", progress) as bar:
        for seq, (begin, end, score_from) in plan:
            ref_logits = None
            for label in order:
                started = time.perf_counter()
                logits = _window_logits(models[label], caches, label, seq[begin:end], score_from - begin)
                targets = torch.tensor(seq[score_from:end], device=logits.device)
                tally = tallies[label]
                for lo in range(0, targets.shape[0], _CHUNK):
                    logp = F.log_softmax(logits[lo: lo + _CHUNK], dim=-1)
                    ref_logp = None
                    if ref_logits is not None:
                        ref_logp = F.log_softmax(ref_logits[lo: lo + _CHUNK].to(logp.device), dim=-1)
                    tally.add_chunk(logp, targets[lo: lo + _CHUNK], ref_logp)
                tally.seconds += time.perf_counter() - started
                if label == reference:
                    ref_logits = logits
            status = f"{sum(t.tokens for t in tallies.values()) // len(tallies)} tokens"
            bar.describe(status)
            bar.advance(status)
    used = sum(1 for s in token_seqs if len(s) >= 2)
    out = {}
    for label in models:
        ref = reference if label != reference else None
        out[label] = {**tallies[label].result(ref, num_bytes), "sequences": used, "windows": len(plan),
                      "max_len": max_len, "stride": stride}
    return out


def _window_logits(model, caches: dict, label: str, ids: Sequence[int], first: int) -> torch.Tensor:
    """Logits ``[T - first, vocab]`` (float32) of a fresh forward over ``ids`` (T tokens, positions 0..T-1),
    at the positions ``first - 1 .. T - 2`` (those predicting tokens ``first .. T - 1``)."""
    from ..cache.kv import KVCache

    T = len(ids)
    cache = caches.get(label)
    if cache is None or cache.capacity < T:  # one cache per model, reused: a fresh prefill overwrites it
        cache = caches[label] = KVCache.for_model(model.config, 1, T, model.dtype, model.device)
    tokens = torch.tensor([list(ids)], device=model.device)
    positions = torch.arange(T, device=model.device)[None]
    index = torch.arange(first - 1, T - 1, device=model.device)[None]
    return model(tokens, positions, cache, logit_index=index, kv_len=T, contiguous_start=0)[0]


def perplexity(model: torch.nn.Module, token_seqs: Sequence[Sequence[int]], max_len: int = 512,
               stride: int | None = None, reference: torch.nn.Module | None = None, num_bytes: int | None = None,
               progress: bool = False) -> dict:
    """``model``'s perplexity on ``token_seqs`` (see the module docstring), with top-1 agreement and KL
    against ``reference`` when given. Returns the dict of one model of ``compare``."""
    models = {"model": model} if reference is None else {"reference": reference, "model": model}
    return compare(models, token_seqs, max_len=max_len, stride=stride, num_bytes=num_bytes, progress=progress,
                   reference=None if reference is None else "reference")["model"]
