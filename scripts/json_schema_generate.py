#!/usr/bin/env python
"""Generate with structured output for every JSON-Schema-Test-Suite schema leaplm accepts, and validate the
generated instances with the ``jsonschema`` package.

For each schema in ``<suite>/tests/<draft>/*.json``: ``llm.compile_constraint`` (llguidance, strict). Rejected
schemas are counted with their reason (the error names the unsupported keyword or the problem). Accepted ones
are generated greedily with the model's chat template and the prompt "Write a JSON value that matches this JSON
schema: <schema>" under ``SamplingParams(json_schema=schema)``; a finished output (``finish_reason == "stop"``)
must parse and validate (``jsonschema.Draft202012Validator``, no format assertion: the suite's semantics; a
schema the validator itself cannot evaluate, e.g. a ``\p{L}`` pattern Python's ``re`` lacks, is "unverifiable");
outputs cut by ``--max-tokens`` are counted apart (a valid prefix, not an instance).

Prints (and with ``--json FILE`` writes) counts: schemas, accepted, rejected, generated, finished, valid,
invalid, cut at max tokens, plus the rejection reasons and every invalid output.

Usage: ``.venv/bin/python scripts/json_schema_generate.py [--model smollm2-135m-instruct] [--max-tokens 64]
[--files type.json,enum.json] [--limit-per-file N] [--batch 8] [--threads 1] [--spec prompt_lookup]
[--json out.json]``; the suite defaults to ``../shared/data/json-schema-test-suite`` next to the repository.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = ROOT.parent / "shared" / "data" / "json-schema-test-suite"
PROMPT = "Write a JSON value that matches this JSON schema: {schema}"


def cases(suite: Path, draft: str, files: list[str] | None, limit: int | None):
    base = suite / "tests" / draft
    paths = [base / f for f in files] if files else sorted(base.glob("*.json"))
    for path in paths:
        for case in json.loads(path.read_text())[:limit]:
            yield path.name, case["description"], case["schema"]


def run(llm, items, max_tokens: int, batch: int, speculative=None, progress: bool = True) -> dict:
    import jsonschema

    from leaplm.errors import InvalidConstraintError
    from leaplm.sampling import SamplingParams

    counts = collections.Counter()
    reasons = collections.Counter()
    invalid, accepted, unverifiable = [], [], []
    for f, desc, schema in items:
        counts["schemas"] += 1
        params = SamplingParams(temperature=0, max_tokens=max_tokens, json_schema=schema)
        try:
            llm.compile_constraint(params)
        except InvalidConstraintError as e:
            counts["rejected"] += 1
            reasons[str(e).split("structured output: ", 1)[-1].splitlines()[0][:120]] += 1
            continue
        counts["accepted"] += 1
        accepted.append((f, desc, schema, params))
    t0 = time.perf_counter()
    for start in range(0, len(accepted), batch):
        group = accepted[start: start + batch]
        prompts = [[{"role": "user", "content": PROMPT.format(schema=json.dumps(s))}] for _, _, s, _ in group]
        outs = llm.chat(prompts, [p for *_, p in group], use_tqdm=False, speculative=speculative)
        for (f, desc, schema, _), o in zip(group, outs):
            counts["generated"] += 1
            counts["tokens"] += len(o.token_ids)
            counts["forced_tokens"] += o.metrics["forced_tokens"]
            if o.finish_reason != "stop":
                counts["cut_at_max_tokens"] += 1
                continue
            counts["finished"] += 1
            try:
                value = json.loads(o.text)
            except ValueError as e:
                errors = [f"not JSON: {e}"]
            else:
                try:
                    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]
                except Exception as e:  # noqa: BLE001 - e.g. a pattern Python's re cannot compile (\p{L})
                    counts["unverifiable"] += 1
                    unverifiable.append({"file": f, "case": desc, "text": o.text, "error": f"{type(e).__name__}: {e}"})
                    continue
            if errors:
                counts["invalid"] += 1
                invalid.append({"file": f, "case": desc, "text": o.text, "errors": errors[:3]})
            else:
                counts["valid"] += 1
        if progress:
            print(f"[{counts['generated']}/{len(accepted)}] valid {counts['valid']} invalid {counts['invalid']} "
                  f"cut {counts['cut_at_max_tokens']} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    counts["generate_s"] = round(time.perf_counter() - t0, 1)
    return {"counts": dict(counts), "rejection_reasons": reasons.most_common(), "invalid": invalid,
            "unverifiable": unverifiable}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", type=Path, default=DEFAULT_SUITE)
    ap.add_argument("--draft", default="draft2020-12")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--files", default=None, help="comma-separated suite files (default: all)")
    ap.add_argument("--limit-per-file", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--spec", default=None, help="speculative method, e.g. prompt_lookup")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if not (a.suite / "tests" / a.draft).is_dir():
        print(f"no {a.suite / 'tests' / a.draft}", file=sys.stderr)
        return 2
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from leaplm import LLM

    llm = LLM(a.model, max_batch_size=a.batch)
    items = list(cases(a.suite, a.draft, a.files.split(",") if a.files else None, a.limit_per_file))
    res = run(llm, items, a.max_tokens, a.batch, a.spec)
    c = res["counts"]
    print(f"JSON Schema Test Suite {a.draft}, {a.model}, greedy, max {a.max_tokens} tokens: {c.get('schemas', 0)} "
          f"schemas, {c.get('accepted', 0)} accepted, {c.get('rejected', 0)} rejected; generated {c.get('generated', 0)}: "
          f"{c.get('finished', 0)} finished -> {c.get('valid', 0)} valid, {c.get('invalid', 0)} invalid, "
          f"{c.get('unverifiable', 0)} the jsonschema package cannot check; "
          f"{c.get('cut_at_max_tokens', 0)} cut at max tokens; {c.get('forced_tokens', 0)} of {c.get('tokens', 0)} "
          f"tokens jump-forward; {c.get('generate_s', 0)} s")
    print("rejection reasons:")
    for reason, n in res["rejection_reasons"][:15]:
        print(f"  {n:4d}  {reason}")
    for u in res["unverifiable"]:
        print(f"UNVERIFIABLE {u['file']}: {u['case']}: {u['text']!r}: {u['error']}")
    for bad in res["invalid"]:
        print(f"INVALID {bad['file']}: {bad['case']}: {bad['text']!r}: {bad['errors']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 1 if c.get("invalid") else 0


if __name__ == "__main__":
    sys.exit(main())
