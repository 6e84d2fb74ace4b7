"""The benchmark protocol and its metrics (Spec-Bench style: batch 1, greedy, warm-up, same run).

``run_bench(cfg: BenchConfig) -> dict`` (the ``results.json`` content; also writes ``outputs.jsonl``
with every generation's token ids when ``cfg.out`` is set):

1. ``torch.set_num_threads(cfg.threads or os.cpu_count())``; load the workload, methods, peers and the
   target model once (``hub.resolve``); a model folder without tokenizer works for token-id workloads.
2. Prompts: ``prompt_ids`` samples as given; text samples through the model's chat template when it
   has one, else the plain text. Multi-turn samples (Spec-Bench's MT-bench rows): turn 2 is rendered
   with ``vanilla``'s own turn-1 answer as the assistant message, and every contestant gets the same ids.
3. Warm-up: the first ``cfg.warmup`` samples (turn 1), run by every contestant, not timed.
4. For each sample and turn: ``vanilla``, then each method, then each peer, one after another
   (interleaved, so machine drift hits all alike). Each call is timed with ``time.perf_counter``.

Metrics per contestant (methods and peers alike; a sample is one question, its turns summed):

* ``tokens_per_s`` - mean over samples of output tokens / generation wall time (Spec-Bench).
* ``speedup_vs_vanilla`` - ``tokens_per_s`` / vanilla's ``tokens_per_s`` (same run, same samples).
* ``mean_accepted_tokens`` - total output tokens / total target forward passes (leaplm methods;
  vanilla = 1.0; None for peers).
* ``ttft_s`` - mean time to first token per generation (from the call, prefill included).
* ``peak_rss_mb`` - the *process's* peak RSS after this contestant's last run (every loaded model and
  loading transients count); ``rss_after_mb`` - the current RSS right after it (psutil).
* ``exact_match_vs_vanilla`` - fraction of samples whose tokens equal vanilla's over the tokens both
  produced (a length difference with an equal common part counts as a divergence at the shorter length,
  unless the shorter one was cut by its own context window); ``first_divergence`` - per sample, the
  index (into the sample's concatenated turns) of the first differing token, or None.
* ``lossy`` (the method does not claim losslessness; None for peers), ``claims_exact``, ``not_exact``
  (claims exactness, greedy, and exact-match < 1), ``status``, ``errors``; all of it also ``per_category``.
* ``decode_tokens_per_s`` - mean over samples of the tokens after the first arrival / (wall time - time to
  first token) (the first arrival is one token, or several when jump-forward appends tokens at the start).

Structured-output workloads (samples with a constraint, e.g. ``--workload json``): every method also runs
constrained (``M+json``), compared for exactness with ``vanilla+json``; see ``structured.py`` for the
contestants, the ``structured`` metrics (mask time per token, compile time, validity) and ``--jump-forward``.

A contestant that raises on a sample gets an ``error`` for that sample (excluded from its means), never a
crash of the whole run; a peer that cannot load is listed with its skipped/failed status.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import BenchError
from . import structured
from ..progress import Progress
from .methods import Generation, MethodRun, Target, load_target, parse_methods
from .peers import PeerEntry, load_peers, parse_peers
from .workloads import Sample, Workload, load_workload

SCHEMA = "leaplm-bench/1"


@dataclass
class BenchConfig:
    workload: str
    model: str | None = None
    draft_model: str | None = None
    limit: int | None = None
    max_tokens: int = 256
    methods: str | None = None
    peers: str | None = None
    temperature: float = 0.0
    threads: int | None = None
    warmup: int = 1
    dtype: str | None = None
    quantization: str | None = None
    device: str | None = None
    seed: int = 0
    out: Path | None = None
    command: list[str] = field(default_factory=list)
    progress: bool = True
    jump_forward: str = "on"    # constrained variants: on | off | both (structured-output workloads)
    compile: bool = False       # torch.compile the target's decode step (models/compiled.py)


@dataclass
class Contestant:
    label: str
    kind: str                                   # "method" | "peer"
    run: Callable[[list[int], Any], Generation] | None
    status: str = "ok"
    lossy: bool | None = None
    claims_exact: bool = False
    info: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    peak_rss_mb: float | None = None
    rss_after_mb: float | None = None
    constrained: bool = False                   # runs with the samples' constraints (structured output)
    jump_forward: bool = True
    reference: str = "vanilla"                  # the contestant its exact match is measured against
    base: str | None = None                     # its unconstrained twin (constrained contestants)
    mask_times: list[float] = field(default_factory=list)   # seconds per grammar mask, timed runs


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, MiB (getrusage; psutil's current RSS as fallback)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    except (ImportError, OSError):
        try:
            import psutil

            return psutil.Process().memory_info().rss / (1024 * 1024)
        except Exception:  # noqa: BLE001
            return None


def rss_mb() -> float | None:
    """Current resident set size of this process, MiB (psutil; None when it is not installed)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except Exception:  # noqa: BLE001
        return None


def first_divergence(ref: list[int], out: list[int], ref_cut: bool = False, out_cut: bool = False) -> int | None:
    """Index of the first token where ``out`` differs from ``ref``, or None (see module docstring).

    ``*_cut``: that output was stopped by its engine's context window (not EOS, not max_tokens).
    """
    n = min(len(ref), len(out))
    for i in range(n):
        if ref[i] != out[i]:
            return i
    if len(ref) == len(out):
        return None
    shorter_cut = out_cut if len(out) < len(ref) else ref_cut
    return None if shorter_cut else n


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


def machine_info(threads: int, target: Target | None = None) -> dict:
    import torch
    import transformers

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "requested_threads": threads,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "leaplm": __version__,
        "git_commit": _git_commit(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        info["memory_gb"] = None
    if target is not None and getattr(target.device, "type", "cpu") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(target.device)
    return info


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- prompts


def render_prompt(target: Target, sample: Sample, turn: int, answers: list[str]) -> list[int]:
    """Token ids of ``sample``'s turn ``turn`` (0-based); ``answers`` are vanilla's earlier answers."""
    if sample.prompt_ids is not None:
        return list(sample.prompt_ids)
    if target.tokenizer is None:
        raise BenchError(f"sample {sample.id!r} is text but the model has no tokenizer; use prompt_ids samples")
    if target.has_chat_template:
        messages: list[dict] = []
        for i in range(turn + 1):
            messages.append({"role": "user", "content": sample.turns[i]})
            if i < turn:
                messages.append({"role": "assistant", "content": answers[i]})
        return target.llm.chat_prompt(messages)
    pieces = [sample.turns[0]]
    for i in range(1, turn + 1):
        pieces += [answers[i - 1], sample.turns[i]]
    return target.tokenizer.encode("\n\n".join(pieces))


# --------------------------------------------------------------------------- protocol


def _contestants(methods: list[MethodRun], peers: list[PeerEntry], target: Target, workload: Workload | None = None,
                 jump_forward: str = "on") -> list[Contestant]:
    out = []
    variants = structured.variants(jump_forward) if workload is not None and workload.constrained else ()
    for m in methods:
        info = {"name": m.spec.name, "knobs": m.knobs, "description": m.spec.description}
        out.append(Contestant(m.label, "method", (lambda ids, p, m=m: m(target, ids, p)),
                              lossy=not m.spec.lossless, claims_exact=m.spec.lossless, info=info))
        for jf in variants:
            t = structured.tag(workload, jf)
            out.append(Contestant(m.label + t, "method", (lambda ids, p, m=m, t=t: m(target, ids, p, m.label + t)),
                                  lossy=not m.spec.lossless, claims_exact=m.spec.lossless, info=info,
                                  constrained=True, jump_forward=jf, reference="vanilla" + t, base=m.label))
    for e in peers:
        run = e.peer.generate if e.peer is not None else None
        out.append(Contestant(e.name, "peer", run, status=e.status, lossy=None, claims_exact=False, info=e.info))
    return out


def _params(cfg: BenchConfig, sample_index: int, turn: int):
    from ..sampling import SamplingParams

    seed = None if cfg.temperature == 0 else cfg.seed + 1000 * sample_index + turn
    return SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)


def _params_for(c: Contestant, sample: Sample, params):
    return structured.constrained_params(params, sample, c.jump_forward) if c.constrained else params


def _timed(c: Contestant, ids: list[int], params) -> tuple[Generation | None, float, str | None]:
    started = time.perf_counter()
    try:
        gen = c.run(ids, params)
    except Exception as e:  # noqa: BLE001 - one failure is a result, not a crash
        return None, time.perf_counter() - started, _error(e)
    return gen, time.perf_counter() - started, None


def run_bench(cfg: BenchConfig) -> dict:
    import torch

    if cfg.max_tokens < 1:
        raise BenchError(f"--max-tokens must be >= 1, got {cfg.max_tokens}")
    if cfg.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {cfg.warmup}")
    if cfg.threads is not None and cfg.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {cfg.threads}")
    threads = cfg.threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, threads)
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) get their setting back


def _run(cfg: BenchConfig, threads: int) -> dict:
    from .. import hub

    workload = load_workload(cfg.workload, cfg.limit)
    methods = parse_methods(cfg.methods)
    peer_names = parse_peers(cfg.peers)
    _params(cfg, 0, 0)  # validates --temperature before the slow loads

    model_path = hub.resolve(cfg.model or hub.DEFAULT_MODEL)
    draft_path = hub.resolve(cfg.draft_model) if cfg.draft_model else None
    target = load_target(model_path, dtype=cfg.dtype, device=cfg.device, need_tokenizer=workload.needs_tokenizer,
                         draft_model_path=draft_path, quantization=cfg.quantization, compile=cfg.compile)
    structured.variants(cfg.jump_forward)
    compile_info = structured.compile_times(target, workload) if workload.constrained else None
    peers = load_peers(peer_names, target, threads)
    contestants = _contestants(methods, peers, target, workload, cfg.jump_forward)
    runnable = [c for c in contestants if c.run is not None]
    outputs: list[dict] = []
    try:
        _warmup(cfg, workload, target, runnable)
        started = time.perf_counter()
        _measure(cfg, workload, target, runnable, outputs)
        elapsed = time.perf_counter() - started
    finally:
        for e in peers:
            if e.peer is not None:
                e.peer.close()

    results = _results(cfg, workload, target, contestants, threads, elapsed)
    if compile_info is not None:
        results["structured"] = {**compile_info, "jump_forward": cfg.jump_forward}
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        with open(cfg.out / "outputs.jsonl", "w", encoding="utf-8") as f:
            for row in outputs:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return results


def _warmup(cfg: BenchConfig, workload: Workload, target: Target, runnable: list[Contestant]) -> None:
    for i, sample in enumerate(workload.samples[: cfg.warmup]):
        try:
            ids = render_prompt(target, sample, 0, [])
            target.engine.check_prompt(ids)
        except Exception:  # noqa: BLE001 - the timed run reports it
            continue
        for c in runnable:
            _timed(c, ids, _params_for(c, sample, _params(cfg, i, 0)))


def _measure(cfg: BenchConfig, workload: Workload, target: Target, runnable: list[Contestant],
             outputs: list[dict]) -> None:
    progress = Progress(len(workload.samples), "bench", cfg.progress, log_every=1).start()
    vanilla = runnable[0]
    try:
        for index, sample in enumerate(workload.samples):
            progress.describe(f"{sample.category}/{sample.id}")
            turns = 1 if sample.prompt_ids is not None else len(sample.turns)
            per: dict[str, list[dict]] = {c.label: [] for c in runnable}
            answers: list[str] = []
            for turn in range(turns):
                params = _params(cfg, index, turn)
                try:
                    ids = render_prompt(target, sample, turn, answers)
                    target.engine.check_prompt(ids)
                    prompt_error = None
                except Exception as e:  # noqa: BLE001 - e.g. prompt too long: recorded for everyone
                    ids, prompt_error = [], _error(e)
                ref: Generation | None = None
                refs: dict[str, Generation | None] = {}   # this turn's outputs of the exactness references
                for c in runnable:
                    if prompt_error is not None:
                        gen, wall, err = None, 0.0, prompt_error
                    else:
                        gen, wall, err = _timed(c, ids, _params_for(c, sample, params))
                        c.peak_rss_mb, c.rss_after_mb = peak_rss_mb(), rss_mb()
                        if gen is not None:
                            c.mask_times.extend(gen.extra.get("mask_times", ()))
                    if c is vanilla:
                        ref = gen
                    refs[c.label] = gen
                    record = _turn_record(gen, wall, err, ids, refs.get(c.reference), target, c.label == c.reference,
                                          params)
                    if sample.constraint is not None:
                        record.update(structured.turn_extra(gen, target, sample))
                    per[c.label].append(record)
                    outputs.append({"label": c.label, "id": sample.id, "category": sample.category, "turn": turn,
                                    "prompt_ids": ids if c is vanilla else None,
                                    "token_ids": gen.token_ids if gen else None, "error": err,
                                    "text": _decode(target, gen.token_ids) if gen else None})
                if ref is None or turn + 1 >= turns:
                    break  # later turns need vanilla's answer
                answers.append((_decode(target, ref.token_ids) or "").strip())
            line = []
            for c in runnable:
                rec = _sample_record(sample, per[c.label])
                c.records.append(rec)
                line.append(f"{c.label} {rec['tokens_per_s']:.1f} tok/s" if rec["error"] is None
                            else f"{c.label} failed")
            progress.advance(f"{sample.category}/{sample.id}: " + ", ".join(line))
    finally:
        progress.stop()


def _decode(target: Target, ids: list[int]) -> str | None:
    return target.tokenizer.decode(ids) if target.tokenizer is not None else None


def _turn_record(gen: Generation | None, wall: float, err: str | None, ids: list[int], ref: Generation | None,
                 target: Target, is_ref: bool, params) -> dict:
    rec = {"prompt_tokens": len(ids), "output_tokens": None, "wall_s": wall, "ttft_s": None, "target_passes": None,
           "finish_reason": None, "first_divergence": None, "compared": False, "error": err}
    if gen is None:
        return rec
    rec.update(output_tokens=len(gen.token_ids), ttft_s=gen.ttft_s, target_passes=gen.target_passes,
               finish_reason=gen.finish_reason, first_tokens=gen.extra.get("first_tokens", min(1, len(gen.token_ids))))
    if ref is not None:
        def cut(g: Generation) -> bool:  # stopped by a context window before max_tokens, without EOS
            return g.finish_reason == "length" and len(g.token_ids) < params.max_tokens

        rec["compared"] = True
        rec["first_divergence"] = None if is_ref else first_divergence(ref.token_ids, gen.token_ids, cut(ref), cut(gen))
    return rec


def _sample_record(sample: Sample, turns: list[dict]) -> dict:
    error = next((t["error"] for t in turns if t["error"]), None)
    rec: dict = {"id": sample.id, "category": sample.category, "turns": len(turns), "error": error,
                 "prompt_tokens": [t["prompt_tokens"] for t in turns]}
    if error is not None:
        rec.update(output_tokens=None, wall_s=None, tokens_per_s=None, decode_tokens_per_s=None, ttft_s=None,
                   target_passes=None, exact=None, first_divergence=None, stopped=None)
        return rec
    out = sum(t["output_tokens"] for t in turns)
    wall = sum(t["wall_s"] for t in turns)
    passes = [t["target_passes"] for t in turns]
    divergence, offset = None, 0
    for t in turns:
        if t["first_divergence"] is not None and divergence is None:
            divergence = offset + t["first_divergence"]
        offset += t["output_tokens"]
    compared = all(t["compared"] for t in turns)
    ttfts = [t["ttft_s"] for t in turns]
    decode_s = wall - sum(ttfts) if all(x is not None for x in ttfts) else None
    decoded = out - sum(t["first_tokens"] for t in turns)   # tokens after each turn's first arrival
    rec.update(output_tokens=out, wall_s=wall, tokens_per_s=out / wall if wall > 0 else None,
               decode_tokens_per_s=decoded / decode_s if decode_s and decoded > 0 else None,
               ttft_s=_mean(t["ttft_s"] for t in turns),
               target_passes=sum(passes) if all(p is not None for p in passes) else None,
               exact=(divergence is None) if compared else None, first_divergence=divergence,
               stopped=all(t["finish_reason"] == "stop" for t in turns))
    if "valid" in turns[0]:   # structured-output sample (single turn in practice): summed / all-of over turns
        valid = [t["valid"] for t in turns]
        rec["valid"] = None if any(v is None for v in valid) else all(valid)
        for key in ("forced_tokens", "pruned_draft_tokens", "constraint_s"):
            vals = [t[key] for t in turns]
            rec[key] = None if any(v is None for v in vals) else sum(vals)
    return rec


# --------------------------------------------------------------------------- metrics


def _metrics(records: list[dict], vanilla_records: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None]
    tps = _mean(r["tokens_per_s"] for r in ok)
    v_tps = _mean(r["tokens_per_s"] for r in vanilla_records if r["error"] is None)
    passes = [r["target_passes"] for r in ok]
    outs = sum(r["output_tokens"] for r in ok)
    compared = [r["exact"] for r in ok if r["exact"] is not None]
    return {
        "n_samples": len(records), "n_ok": len(ok), "n_failed": len(records) - len(ok),
        "tokens_per_s": tps,
        "decode_tokens_per_s": _mean(r.get("decode_tokens_per_s") for r in ok),
        "speedup_vs_vanilla": tps / v_tps if tps is not None and v_tps else None,
        "mean_accepted_tokens": outs / sum(passes) if ok and all(p is not None for p in passes) and sum(passes) else None,
        "ttft_s": _mean(r["ttft_s"] for r in ok),
        "exact_match_vs_vanilla": sum(compared) / len(compared) if compared else None,
        "output_tokens": outs,
    }


def _summary(c: Contestant, vanilla: Contestant, categories: list[str], greedy: bool) -> dict:
    base = {"kind": c.kind, "status": c.status, "lossy": c.lossy, "claims_exact": c.claims_exact, **c.info}
    if c.run is None:
        empty = {k: None for k in ("tokens_per_s", "speedup_vs_vanilla", "mean_accepted_tokens", "ttft_s",
                                   "peak_rss_mb", "rss_after_mb", "exact_match_vs_vanilla")}
        return {**base, **empty, "not_exact": False, "n_samples": 0, "n_ok": 0, "n_failed": 0, "output_tokens": 0,
                "first_divergence": [], "errors": [], "per_category": {}, "samples": []}
    m = _metrics(c.records, vanilla.records)
    if c.kind == "peer":
        m["mean_accepted_tokens"] = None
    per_category = {}
    for cat in categories:
        mine = [r for r in c.records if r["category"] == cat]
        ref = [r for r in vanilla.records if r["category"] == cat]
        pc = _metrics(mine, ref)
        if c.kind == "peer":
            pc["mean_accepted_tokens"] = None
        per_category[cat] = pc
    exact = m["exact_match_vs_vanilla"]
    return {
        **base, **m, "peak_rss_mb": c.peak_rss_mb, "rss_after_mb": c.rss_after_mb,
        "not_exact": bool(c.claims_exact and greedy and exact is not None and exact < 1.0),
        "first_divergence": [r["first_divergence"] for r in c.records],
        "errors": [{"id": r["id"], "error": r["error"]} for r in c.records if r["error"]],
        "per_category": per_category,
        "samples": c.records,
    }


def _results(cfg: BenchConfig, workload: Workload, target: Target, contestants: list[Contestant], threads: int,
             elapsed: float) -> dict:
    vanilla = contestants[0]
    cats = workload.categories
    greedy = cfg.temperature == 0
    summaries = {c.label: _summary(c, vanilla, cats, greedy) for c in contestants}
    if workload.constrained:
        for c in contestants:
            if c.run is not None:
                summaries[c.label]["structured"] = structured.summary(c, summaries, c.mask_times)
    multi = any(len(s.turns) > 1 for s in workload.samples)
    notes = ["tokens/s = mean over samples of output tokens / generation wall time; token ids only "
             "(no detokenization) for every method and peer; batch 1",
             "peak_rss_mb is the whole process's peak RSS (getrusage) after that contestant's last run: every "
             "loaded model (leaplm target, peers) and loading transients count; rss_after_mb (results.json) is "
             "the current RSS right after its last run"]
    if multi:
        notes.append("multi-turn samples run all their turns (Spec-Bench style: turn 2 carries vanilla's own "
                     "turn-1 answer); a sample's tokens and times are summed over its turns")
    if getattr(target.model, "quantization", None):
        notes.append(f"leaplm's methods run {target.model.quantization} weights; peers run the checkpoint's float "
                     "weights, so a peer's exact-match against vanilla measures the quantization, not a bug")
    if getattr(target.model, "compiled", None) is not None:
        notes.append("leaplm's decode and verify passes ran torch.compile'd (--compile; compiled once at load, "
                     "not timed); prefill ran eager")
    if not greedy:
        notes.append(f"temperature {cfg.temperature}: sampled outputs are not expected to match vanilla "
                     "token for token; exact-match is informational")
    if workload.constrained:
        notes.append("structured output: each method also ran constrained by the samples' schemas (label +json; "
                     "+json-nojf without jump-forward); a constrained contestant's exact match is against its "
                     "vanilla counterpart (vanilla+json), its speed-up against plain vanilla; peers run unconstrained")
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": machine_info(threads, target),
        "model": {"arg": cfg.model, "path": str(target.model_path), "family": getattr(target.model.config, "family", None),
                  "dtype": str(target.dtype).replace("torch.", ""), "device": str(target.device),
                  "quantization": getattr(target.model, "quantization", None),
                  "compiled": getattr(target.model, "compiled", None) is not None,
                  "compile_s": getattr(getattr(target.model, "compiled", None), "compile_s", None),
                  "tokenizer": target.tokenizer is not None, "chat_template": target.has_chat_template},
        "draft_model": str(target.draft_model_path) if target.draft_model_path else None,
        "workload": {"spec": cfg.workload, "name": workload.name, "source": workload.source,
                     "n_samples": len(workload.samples), "categories": {c: sum(s.category == c for s in workload.samples)
                                                                        for c in cats},
                     "turns": "all" if multi else "1"},
        "limit": cfg.limit, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "greedy": greedy,
        "warmup": cfg.warmup, "threads": threads, "elapsed_s": elapsed,
        "methods": {k: v for k, v in summaries.items() if v["kind"] == "method"},
        "peers": {k: v for k, v in summaries.items() if v["kind"] == "peer"},
        "not_exact": [k for k, v in summaries.items() if v["not_exact"]],
        "notes": notes,
    }
