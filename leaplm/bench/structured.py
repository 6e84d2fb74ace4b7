"""Structured-output benchmarking: what ``leaplm bench --workload json`` adds to the protocol.

A workload whose samples carry a constraint (``Sample.constraint``, e.g. the built-in ``json`` workload)
runs every leaplm method twice per sample: as is (unconstrained: the model writes what it likes) and
constrained (``M+json``: ``SamplingParams(json_schema=...)``; ``--jump-forward both`` adds ``M+json-nojf``).
Contestant order: ``vanilla``, ``vanilla+json`` [, ``vanilla+json-nojf``], then each method and its variants,
then the peers (unconstrained: they have no grammar engine). A constrained contestant's exact-match reference
is its vanilla counterpart (``prompt_lookup+json`` vs ``vanilla+json``); speed-ups stay relative to plain
``vanilla``, so ``vanilla+json``'s speed-up is the throughput constraints cost (or gain with jump-forward).

Measured, per contestant (``summary["structured"]`` in results.json):

* ``mask_us_p50`` / ``mask_us_p99`` - time to compute one next-token mask (``Constraint.fill_mask``; the root
  and every verified draft node count), over every mask of the timed runs;
* ``constraint_ms_per_token`` - all the grammar's work (masks, draft pruning, advancing, jump-forward; not the
  ``[N, V]`` logits masking on the model's device) per output token;
* ``forced_share`` - output tokens appended by jump-forward; ``pruned_draft_tokens`` - draft tokens dropped
  before verification because the grammar rejects them;
* ``valid_rate`` - outputs that parse (``json.loads`` of the whole text) and validate under ``jsonschema``
  (samples with a ``json_schema`` / ``json_object``), for unconstrained contestants and peers too;
  ``stopped_rate`` - outputs that ended by themselves (not at ``--max-tokens``);
* ``speedup_vs_unconstrained`` / ``decode_speedup_vs_unconstrained`` - tokens/s (decode tokens/s: after the
  first token, so output length and prefill do not weigh in) over the same method's unconstrained run.

Compile time (``results["structured"]``): ``compile_constraint`` of each distinct constraint of the workload,
cold, before the warm-up (``compile_ms``: wall, ``build_ms``: llguidance's own build + first mask), and the
one-off llguidance tokenizer setup (``tokenizer_setup_s``).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace

from . import BenchError

JUMP_FORWARD = {"on": (True,), "off": (False,), "both": (True, False)}


def variants(jump_forward: str) -> tuple[bool, ...]:
    if jump_forward not in JUMP_FORWARD:
        raise BenchError(f"--jump-forward must be one of {', '.join(JUMP_FORWARD)}, got {jump_forward!r}")
    return JUMP_FORWARD[jump_forward]


def tag(workload, jump_forward: bool) -> str:
    """Label suffix of a constrained contestant: ``+json`` / ``+json-nojf`` (``+grammar`` for regex / grammar)."""
    kinds = {k for s in workload.samples if s.constraint for k in s.constraint}
    base = "json" if kinds <= {"json_schema", "json_object"} else "grammar"
    return f"+{base}" + ("" if jump_forward else "-nojf")


def constrained_params(params, sample, jump_forward: bool):
    """``params`` with the sample's constraint (unchanged for a sample without one)."""
    if sample.constraint is None:
        return params
    return replace(params, **sample.constraint, jump_forward=jump_forward)


def compile_times(target, workload) -> dict:
    """Cold compile of each distinct constraint of the workload (see the module docstring)."""
    from ..constrain import llguidance_tokenizer
    from ..sampling import SamplingParams

    if target.llm is None:
        raise BenchError("structured-output samples need the model's tokenizer (a folder with tokenizer files)")
    t = time.perf_counter()
    llguidance_tokenizer(target.tokenizer, target.model.config.vocab_size)
    out: dict = {"tokenizer_setup_s": time.perf_counter() - t, "compile_ms": {}, "build_ms": {}, "errors": {}}
    seen: set[str] = set()
    for s in workload.samples:
        if s.constraint is None:
            continue
        key = json.dumps(s.constraint, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        t = time.perf_counter()
        try:
            compiled = target.llm.compile_constraint(SamplingParams(**s.constraint))
        except Exception as e:  # noqa: BLE001 - the sample's runs report it too
            out["errors"][s.id] = f"{type(e).__name__}: {e}"
            continue
        out["compile_ms"][s.id] = 1000 * (time.perf_counter() - t)
        if getattr(compiled, "compile_s", None) is not None:
            out["build_ms"][s.id] = 1000 * compiled.compile_s
    ms = sorted(out["compile_ms"].values())
    out["compile_ms_p50"] = percentile(ms, 0.5)
    out["compile_ms_max"] = ms[-1] if ms else None
    return out


def percentile(values: list[float], q: float) -> float | None:
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def output_valid(target, sample, token_ids: list[int]) -> bool | None:
    """Does the output text parse as JSON valid under the sample's schema? None: not a JSON sample."""
    kinds = sample.constraint or {}
    if not ({"json_schema", "json_object"} & set(kinds)) or target.tokenizer is None:
        return None
    try:
        value = json.loads(target.tokenizer.decode(token_ids))
    except ValueError:
        return False
    if "json_object" in kinds:
        return isinstance(value, dict)
    schema = kinds["json_schema"]
    if isinstance(schema, bool):
        return schema
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - a test extra
        return None
    return not any(True for _ in jsonschema.Draft202012Validator(schema).iter_errors(value))


def turn_extra(gen, target, sample) -> dict:
    """Per-turn structured-output fields of a run record."""
    if gen is None:
        return {"valid": None, "forced_tokens": None, "pruned_draft_tokens": None, "constraint_s": None}
    e = gen.extra
    return {"valid": output_valid(target, sample, gen.token_ids), "forced_tokens": e.get("forced_tokens"),
            "pruned_draft_tokens": e.get("pruned_draft_tokens"), "constraint_s": e.get("constraint_s")}


def _sum(records: list[dict], key: str):
    vals = [r.get(key) for r in records]
    return sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None


def summary(c, summaries: dict, mask_times: list[float]) -> dict:
    """The ``structured`` block of contestant ``c``'s summary (``summaries``: label -> summary, twins first)."""
    ok = [r for r in c.records if r["error"] is None]
    out_tokens = sum(r["output_tokens"] for r in ok)
    forced = _sum(ok, "forced_tokens")
    constraint_s = _sum(ok, "constraint_s")
    valid = [r["valid"] for r in ok if r.get("valid") is not None]
    twin = summaries.get(c.base) if c.base else None
    mine = summaries[c.label]

    def ratio(key: str):
        a, b = mine.get(key), (twin or {}).get(key)
        return a / b if a is not None and b else None

    return {
        "constrained": c.constrained, "jump_forward": c.jump_forward if c.constrained else None,
        "unconstrained_twin": c.base, "exact_reference": c.reference,
        "speedup_vs_unconstrained": ratio("tokens_per_s"),
        "decode_speedup_vs_unconstrained": ratio("decode_tokens_per_s"),
        "mask_us_p50": 1e6 * percentile(mask_times, 0.5) if mask_times else None,
        "mask_us_p99": 1e6 * percentile(mask_times, 0.99) if mask_times else None,
        "masks": len(mask_times),
        "constraint_ms_per_token": 1000 * constraint_s / out_tokens if constraint_s is not None and out_tokens else None,
        "forced_share": forced / out_tokens if forced is not None and out_tokens else None,
        "pruned_draft_tokens": _sum(ok, "pruned_draft_tokens"),
        "valid_rate": sum(valid) / len(valid) if valid else None,
        "stopped_rate": sum(r["stopped"] for r in ok) / len(ok) if ok else None,
    }


def _num(v, fmt: str) -> str:
    return "—" if v is None else fmt.format(v)


def table_rows(results: dict) -> list[list[str]]:
    """Header + one row per contestant that ran: the structured-output metrics."""
    rows = [["contestant", "constrained", "tok/s", "decode tok/s", "vs unconstrained (decode)", "mask p50 µs",
             "mask p99 µs", "grammar ms/token", "forced", "valid JSON", "ended by itself"]]
    for label, s in {**results["methods"], **results["peers"]}.items():
        x = s.get("structured") or {}
        if s["status"] != "ok":
            continue
        rows.append([label, "yes" + ("" if x.get("jump_forward") else ", no jump-forward") if x.get("constrained") else "no",
                     _num(s["tokens_per_s"], "{:.1f}"), _num(s.get("decode_tokens_per_s"), "{:.1f}"),
                     (_num(x.get("speedup_vs_unconstrained"), "{:.2f}x") + " ("
                      + _num(x.get("decode_speedup_vs_unconstrained"), "{:.2f}x") + ")") if x.get("constrained") else "",
                     _num(x.get("mask_us_p50"), "{:.0f}"), _num(x.get("mask_us_p99"), "{:.0f}"),
                     _num(x.get("constraint_ms_per_token"), "{:.3f}"), _num(x.get("forced_share"), "{:.0%}"),
                     _num(x.get("valid_rate"), "{:.0%}"), _num(x.get("stopped_rate"), "{:.0%}")])
    return rows


def report_lines(results: dict) -> list[str]:
    """The report's "Structured output" section (empty when the workload has no constraints)."""
    st = results.get("structured")
    if not st:
        return []
    rows = table_rows(results)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    compile_ms = st.get("compile_ms") or {}
    lines = ["## Structured output", "",
             f"- compile (cold, per distinct constraint): p50 {_num(st.get('compile_ms_p50'), '{:.1f}')} ms, max "
             f"{_num(st.get('compile_ms_max'), '{:.1f}')} ms over {len(compile_ms)} constraints; llguidance tokenizer "
             f"setup {_num(st.get('tokenizer_setup_s'), '{:.2f}')} s (once per tokenizer)",
             f"- jump-forward: {st.get('jump_forward')}"]
    lines += [f"- compile error, sample {sid}: {err}" for sid, err in (st.get("errors") or {}).items()]
    lines += ["", *table, "",
              "constrained = generated under the sample's schema (exact match of a constrained contestant is against "
              "its vanilla counterpart); decode tok/s = tokens after the first / time after the first; mask = one "
              "next-token mask (root and every verified draft node); grammar ms/token = all constraint work (masks, "
              "pruning drafts, advancing, jump-forward) per output token; forced = share of output tokens appended "
              "by jump-forward; valid JSON = the whole output parses and validates under the schema; ended by "
              "itself = not cut at --max-tokens.", ""]
    return lines
