#!/usr/bin/env python
"""How much of the official JSON Schema Test Suite leaplm's structured output (llguidance) accepts.

For every schema in ``<suite>/tests/<draft>/*.json`` (``--optional``: also ``optional/**``) it calls
``compile_constraint(tokenizer, json_schema=schema)`` and counts accepted / rejected schemas with the rejection
reasons. For each accepted schema it also checks the suite's instances: ``json.dumps(data, ensure_ascii=False)``
(leaplm's output form: ``", "`` / ``": "`` separators) tokenized + EOS, run through ``Constraint.validate``:

* ``valid_accepted`` / ``invalid_rejected`` - grammar and suite agree;
* ``valid_rejected`` - the grammar cannot produce that valid instance (often only its *form*: llguidance emits
  properties in schema order, integers without ``.0``...): the constraint is stricter than the schema;
* ``invalid_accepted`` - the grammar lets an invalid instance through (a keyword llguidance approximates).

Usage: ``.venv/bin/python scripts/json_schema_suite.py [--suite DIR] [--draft draft2020-12] [--optional]
[--model GGUF-or-tokenizer-dir] [--top 15]``; default suite ``../shared/data/json-schema-test-suite``
(relative to the repository root), default model the SmolLM2 GGUF in ``$LEAPLM_MODELS`` /
``~/.cache/leaplm/models``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = ROOT.parent / "shared" / "data" / "json-schema-test-suite"
DEFAULT_MODEL = Path(os.environ.get("LEAPLM_MODELS", Path.home() / ".cache" / "leaplm" / "models")) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Survey:
    accepted: int = 0
    rejected: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)        # grouped reason -> count
    rejections: list[tuple[str, str, str]] = field(default_factory=list)              # (file, description, message)
    instances: collections.Counter = field(default_factory=collections.Counter)      # valid_accepted, ...
    mismatches: list[tuple[str, str, str, str]] = field(default_factory=list)         # (kind, file, case, test)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.accepted + self.rejected


def _groups(message: str) -> list[str]:
    """Reason keys for counting: one per unimplemented keyword, else the first line with specifics elided."""
    reason = message.split(": ", 1)[1] if ": " in message else message
    m = re.search(r"Unimplemented keys: \[([^\]]*)\]", reason)
    if m:
        return [f"unimplemented keyword {k.strip()}" for k in m.group(1).split(",") if k.strip()]
    line = reason.strip().splitlines()[0] if reason.strip() else "(empty)"
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "…", line)
    return [re.sub(r"\d+(\.\d+)?", "N", line)[:100]]


def suite_files(suite: Path, draft: str, optional: bool = False) -> list[Path]:
    base = suite / "tests" / draft
    files = sorted(base.glob("*.json"))
    if optional:
        files += sorted((base / "optional").rglob("*.json"))
    return files


def survey(tokenizer, suite: Path, draft: str = "draft2020-12", optional: bool = False,
           check_instances: bool = True) -> Survey:
    from leaplm.constrain import compile_constraint
    from leaplm.errors import InvalidConstraintError

    eos = min(tokenizer.eos_token_ids)
    out = Survey()
    t0 = time.perf_counter()
    for path in suite_files(suite, draft, optional):
        rel = str(path.relative_to(suite / "tests" / draft))
        for case in json.loads(path.read_text()):
            try:
                compiled = compile_constraint(tokenizer, json_schema=case["schema"])
            except InvalidConstraintError as e:
                out.rejected += 1
                out.rejections.append((rel, case["description"], str(e)))
                out.reasons.update(_groups(str(e)))
                continue
            out.accepted += 1
            if not check_instances:
                continue
            for test in case["tests"]:
                ids = tokenizer.encode(json.dumps(test["data"], ensure_ascii=False), add_special_tokens=False) + [eos]
                ok = compiled.new().validate(ids) == len(ids)
                kind = f"{'valid' if test['valid'] else 'invalid'}_{'accepted' if ok else 'rejected'}"
                out.instances[kind] += 1
                if ok != test["valid"]:
                    out.mismatches.append((kind, rel, case["description"], test["description"]))
    out.seconds = time.perf_counter() - t0
    return out


def report(s: Survey, top: int = 15, draft: str = "") -> str:
    lines = [f"JSON Schema Test Suite {draft}: {s.total} schemas, {s.accepted} accepted, {s.rejected} rejected "
             f"({100 * s.accepted / max(1, s.total):.1f}% accepted) in {s.seconds:.1f}s",
             "top rejection reasons (a schema may count under several):"]
    lines += [f"  {n:4d}  {r}" for r, n in s.reasons.most_common(top)]
    if s.instances:
        i = s.instances
        lines.append(f"instances of accepted schemas: {sum(i.values())}: valid accepted {i['valid_accepted']}, "
                     f"invalid rejected {i['invalid_rejected']}, valid rejected {i['valid_rejected']} (stricter), "
                     f"invalid accepted {i['invalid_accepted']} (looser)")
        by_file = collections.Counter((k, f) for k, f, _, _ in s.mismatches)
        lines += [f"  {n:4d}  {k:16s} {f}" for (k, f), n in by_file.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", type=Path, default=DEFAULT_SUITE)
    ap.add_argument("--draft", default="draft2020-12")
    ap.add_argument("--optional", action="store_true", help="also the optional/ tests")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF file or HF tokenizer folder")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-instances", action="store_true", help="only compile the schemas")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every rejection")
    a = ap.parse_args(argv)
    if not (a.suite / "tests" / a.draft).is_dir():
        print(f"no {a.suite / 'tests' / a.draft}", file=sys.stderr)
        return 2
    from leaplm.tokenizer import Tokenizer

    tok = Tokenizer.from_path(a.model)
    s = survey(tok, a.suite, a.draft, a.optional, not a.no_instances)
    if a.verbose:
        for f, d, m in s.rejections:
            print(f"REJECT {f}: {d}: {m.splitlines()[0]}")
    print(report(s, a.top, a.draft))
    return 0


if __name__ == "__main__":
    sys.exit(main())
