#!/usr/bin/env python
"""Per-token cost of structured-output masks (leaplm.constrain, llguidance backend) on a real tokenizer.

For a few constraints it times, at every position of (a) realistic documents (hand-written JSON / text, tokenized)
and (b) random walks (uniformly random allowed tokens, up to ``--steps``), these per-token operations:
``fill_mask`` into an int32 ``[W]`` bitmask (the llguidance work), ``advance`` of one token, and the bitmask ->
bool ``[V]`` unpack and ``apply_bitmask_`` on a ``[1, V]`` fp32 logits row (CPU torch). Prints p50 / p99 / max in
microseconds, plus compile and ``new()`` times.

Usage: ``.venv/bin/python scripts/constraint_mask_time.py [--model GGUF] [--walks 20] [--steps 200] [--threads 1]``
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = Path(os.environ.get("LEAPLM_MODELS", Path.home() / ".cache" / "leaplm" / "models")) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "email", "address", "tags"], "additionalProperties": False}
PERSON_DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
              "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
              "tags": ["mathematician", "writer", "first programmer"]}
CASES = {
    "json-schema person": (dict(json_schema=PERSON), json.dumps(PERSON_DOC)),
    "json object": (dict(json_object=True), json.dumps({"title": "A tale of two cities", "year": 1859,
                                                        "chapters": [{"n": i, "words": 1000 + 37 * i}
                                                                     for i in range(4)], "in_print": True})),
    "regex phone": (dict(regex=r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}"), "(555) 123-4567"),
    "lark arithmetic": (dict(grammar='start: e\ne: t (("+"|"-") t)*\nt: f (("*"|"/") f)*\n'
                                     'f: /[0-9]+/ | "(" e ")"'), "(12+7)*3-(4/2)+100*(5-1)"),
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the unpack/apply timings")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from leaplm.constrain import (apply_bitmask_, bitmask_width, compile_constraint, llguidance_tokenizer,
                                  unpack_bitmask)
    from leaplm.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_path(a.model)
    t1 = time.perf_counter()
    v, w = tok.vocab_size, bitmask_width(tok.vocab_size)
    llguidance_tokenizer(tok)
    print(f"tokenizer {a.model.name}: V={v} (W={w} words), loaded in {t1 - t0:.2f}s, "
          f"llguidance LLTokenizer built in {time.perf_counter() - t1:.2f}s (once per tokenizer)")
    row = torch.empty(w, dtype=torch.int32)
    logits = torch.randn(1, v)
    fill_all, adv_all = [], []
    for name, (kw, doc) in CASES.items():
        t0 = time.perf_counter()
        compiled = compile_constraint(tok, **kw)
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(100):
            compiled.new()
        t_new = (time.perf_counter() - t0) / 100
        fill, adv = [], []
        # (a) a realistic document, token by token
        ids = tok.encode(doc, add_special_tokens=False)
        c = compiled.new()
        assert c.validate(ids) == len(ids), (name, c.validate(ids), len(ids))
        for t in ids:
            s = time.perf_counter_ns(); c.fill_mask(row); fill.append((time.perf_counter_ns() - s) / 1e3)
            s = time.perf_counter_ns(); c.advance([t]); adv.append((time.perf_counter_ns() - s) / 1e3)
        doc_fill = list(fill)
        # (b) random walks
        rng = random.Random(0)
        for _ in range(a.walks):
            c = compiled.new()
            for _ in range(a.steps):
                if c.is_finished() or (c.can_stop() and rng.random() < 0.05):
                    break
                s = time.perf_counter_ns(); c.fill_mask(row); fill.append((time.perf_counter_ns() - s) / 1e3)
                allowed = unpack_bitmask(row, v).nonzero().view(-1).tolist()
                allowed = [t for t in allowed if t not in tok.eos_token_ids] or allowed
                t = rng.choice(allowed)
                s = time.perf_counter_ns(); c.advance([t]); adv.append((time.perf_counter_ns() - s) / 1e3)
        fill_all += fill
        adv_all += adv
        print(f"{name:20s} compile {t_compile * 1e3:7.1f} ms  new() {t_new * 1e6:6.1f} us  "
              f"fill_mask p50 {pct(fill, .5):7.1f} p99 {pct(fill, .99):7.1f} max {max(fill):8.1f} us "
              f"(document p50 {statistics.median(doc_fill):6.1f} us)  advance p50 {pct(adv, .5):5.1f} "
              f"p99 {pct(adv, .99):6.1f} us  [{len(fill)} steps]")
    unpack, apply = [], []
    for _ in range(300):
        s = time.perf_counter_ns(); unpack_bitmask(row, v); unpack.append((time.perf_counter_ns() - s) / 1e3)
        s = time.perf_counter_ns()
        apply_bitmask_(logits, row.view(1, -1))
        apply.append((time.perf_counter_ns() - s) / 1e3)
    print(f"{'all constraints':20s} fill_mask p50 {pct(fill_all, .5):.1f} us  p99 {pct(fill_all, .99):.1f} us  "
          f"max {max(fill_all):.1f} us over {len(fill_all)} steps; advance p50 {pct(adv_all, .5):.1f} us "
          f"p99 {pct(adv_all, .99):.1f} us")
    print(f"torch CPU ({a.threads} thread): unpack bitmask->bool[V] p50 {pct(unpack, .5):.1f} us; "
          f"apply_bitmask_ on [1, V] fp32 p50 {pct(apply, .5):.1f} us p99 {pct(apply, .99):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
