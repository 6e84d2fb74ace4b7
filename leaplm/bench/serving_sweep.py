"""The serving benchmark's sweep: loads the target, runs leaplm's methods and the peers at each concurrency level
(``serving.run_sweep``), and writes the results (``serving_report``). ``run_serving(cfg) -> results dict`` is what
``leaplm bench --concurrency`` calls. Kept apart from ``serving.py`` (the closed loop and its metrics) so that the
peers (``serving_peers.py``), which use the loop's types, and this driver, which uses the peers, import no cycle."""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path

from . import BenchError
from .serving import (SCHEMA, LeapLMBackend, ServingConfig, Sweep, empty_row, parse_concurrency,
                      parse_serving_methods, parse_serving_peers, requests_for, run_sweep, serving_prompts)
from .serving_peers import make_peer_sweep


def _llm_kwargs(cfg: ServingConfig, most: int) -> dict:
    """``LLM(...)`` arguments: the bench's model options, with room for ``most`` requests decoding together."""
    return dict(dtype=cfg.dtype, device=cfg.device, download=False, quantization=cfg.quantization,
                compile=cfg.compile, max_num_seqs=most)


def run_serving(cfg: ServingConfig) -> dict:
    import torch

    if cfg.max_tokens < 1:
        raise BenchError(f"--max-tokens must be >= 1, got {cfg.max_tokens}")
    if cfg.requests is not None and cfg.requests < 1:
        raise BenchError(f"--requests must be >= 1, got {cfg.requests}")
    if cfg.threads is not None and cfg.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {cfg.warmup}")
    threads = cfg.threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, threads)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: ServingConfig, threads: int) -> dict:
    from .. import hub
    from ..llm import LLM
    from ..sampling import SamplingParams
    from .methods import Target
    from .runner import machine_info
    from .workloads import load_workload

    levels = parse_concurrency(cfg.concurrency)
    workload = load_workload(cfg.workload, cfg.limit)
    if workload.constrained:
        raise BenchError("--concurrency runs unconstrained prompts; structured-output workloads (json) are not "
                         "supported by the serving benchmark")
    peers = parse_serving_peers(cfg.peers)
    model_path = hub.resolve(cfg.model or hub.DEFAULT_MODEL)
    draft_path = str(hub.resolve(cfg.draft_model)) if cfg.draft_model else None
    methods = parse_serving_methods(cfg.methods, draft_path)
    llm = LLM(str(model_path), **_llm_kwargs(cfg, max(levels)))
    eos = sorted(llm.tokenizer.eos_token_ids)
    target = Target(Path(llm.model_path), llm.model, llm.engine, llm.tokenizer, llm, eos, llm.device, llm.dtype)
    prompts, prompt_ids = serving_prompts(target, workload, cfg.max_tokens)
    if cfg.requests is not None and cfg.requests > len(prompts):
        raise BenchError(f"--requests {cfg.requests} exceeds the {len(prompts)} prompts of workload "
                         f"{workload.name!r} that fit the context window; lower it or use a larger workload")
    machine = machine_info(threads, target)
    model = {"arg": cfg.model, "path": str(llm.model_path), "dtype": str(llm.dtype).replace("torch.", ""),
             "device": str(llm.device), "quantization": getattr(llm, "quantization", None), "compiled": bool(cfg.compile)}
    dtype, device = llm.dtype, llm.device
    params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)

    def n_requests(c: int) -> int:
        return requests_for(c, cfg.requests, len(prompts))

    log = (lambda text: print(f"[serving] {text}", file=sys.stderr, flush=True)) if cfg.progress else None
    long_prompt, chunk_s, chunk_tokens, chunk_times = None, None, None, None
    if cfg.long_prompt:
        chunk_tokens = llm.engine.prefill_chunk
        long_prompt = make_long_prompt(prompts, cfg.long_prompt, llm.engine.max_model_len - cfg.max_tokens)
        prefill_chunk_seconds(llm.engine, long_prompt)   # warm-up
        chunk_times = prefill_chunk_seconds(llm.engine, long_prompt)
        chunk_s = max(chunk_times)
    records: list[dict] = []
    started = time.perf_counter()
    rows = _method_rows(llm.engine, methods, prompts, levels, n_requests, params, cfg, log, records, long_prompt)
    del llm, target   # peers' in-process RSS (hf-serve) should not carry leaplm's model and KV pool
    import gc

    gc.collect()
    for name in peers:
        sweep = make_peer_sweep(name, model_path=Path(model["path"]), eos_token_ids=eos, dtype=dtype, device=device,
                                threads=threads, max_tokens=cfg.max_tokens, longest_prompt=max(map(len, prompts)),
                                llama_server=cfg.llama_server, log_dir=cfg.out)
        if isinstance(sweep, str):
            rows += [empty_row(name, "peer", c, sweep) for c in levels]
            if log:
                log(f"{name}: {sweep}")
            continue
        rows += run_sweep(sweep, prompts, levels, n_requests, params, warmup=cfg.warmup,
                          request_timeout=cfg.request_timeout, log=log, records_out=records, long_prompt=long_prompt)
    elapsed = time.perf_counter() - started
    most = max(n_requests(c) for c in levels)
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": machine,
        "model": model,
        "draft_model": draft_path,
        "workload": {"spec": cfg.workload, "name": workload.name, "source": workload.source,
                     "n_prompts": len(prompts), "prompt_ids": prompt_ids[:most], "turns": "first"},
        "concurrency": levels, "requests": {str(c): most if c == 1 else n_requests(c) for c in levels},
        "max_tokens": cfg.max_tokens, "temperature": 0.0, "greedy": True, "warmup": cfg.warmup, "threads": threads,
        "elapsed_s": elapsed, "rows": rows, "notes": _notes(levels, model["quantization"], cfg.long_prompt),
        "long_prompt_tokens": len(long_prompt) if long_prompt else None, "prefill_chunk_tokens": chunk_tokens,
        "prefill_chunk_s": chunk_s, "prefill_chunk_steps_s": chunk_times if cfg.long_prompt else None,
        "_records": records,
    }


def make_long_prompt(prompts: list[list[int]], tokens: int, room: int) -> list[int]:
    """A ``tokens``-token prompt made of the workload's prompts one after another (real text, as a user pasting a
    long document would send), cut to ``tokens``; ``BenchError`` when the context window (``room`` tokens left for
    the prompt) cannot hold it."""
    if tokens > room:
        raise BenchError(f"--long-prompt {tokens}: the context window leaves room for {room} prompt tokens with "
                         "--max-tokens; lower one of them")
    out: list[int] = []
    while len(out) < tokens:
        for p in prompts:
            out += p
    return out[:tokens]


def prefill_chunk_seconds(engine, prompt: list[int]) -> list[float]:
    """Seconds of each engine step that prefills one chunk (``engine.prefill_chunk`` tokens) of ``prompt`` alone,
    in order (the last chunk's step also samples the first token). Later chunks attend to more keys and cost more:
    the slowest is what one chunk may add to a running stream's inter-token gap."""
    from ..sampling import SamplingParams

    engine.reset_prefix_cache()
    rid = engine.add_request(list(prompt), SamplingParams(temperature=0, max_tokens=1))
    times = []
    try:
        while not engine.get_request(rid).finished:
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    finally:
        engine.abort(rid)
        engine.release(rid)
        engine.reset_prefix_cache()
    return times


def _method_rows(engine, methods, prompts, levels, n_requests, params, cfg: ServingConfig, log, records,
                 long_prompt=None) -> list[dict]:
    """The rows of leaplm's methods, each a ``LeapLMBackend`` on ``engine`` swept over the levels."""
    rows: list[dict] = []
    for label, spec in methods:
        try:
            backend = LeapLMBackend(engine, spec, label, info={"engine": "leaplm", "speculative": spec})
        except BenchError as e:
            rows += [empty_row(label, "method", c, f"skipped: {e}") for c in levels]
            continue
        rows += run_sweep(Sweep(label, "method", lambda c, b=backend: b, finish=backend.close), prompts, levels,
                          n_requests, params, warmup=cfg.warmup, request_timeout=cfg.request_timeout, log=log,
                          records_out=records, long_prompt=long_prompt)
    return rows


def _notes(levels: list[int], quantization: str | None, long_prompt: int | None = None) -> list[str]:
    notes = [
        "closed loop: C requests in flight, the next prompt submitted as soon as one finishes; every backend gets "
        "the same prompts (first turn, chat template, categories interleaved) in the same order; greedy",
        "output_tokens_per_s = output tokens of the requests without error / wall time of the loop; TTFT = submission "
        "-> first token delivery; ITL = gap between a request's consecutive deliveries (a delivery of n tokens counts "
        "as n gaps of gap/n); percentiles interpolate linearly",
        "exact_match_vs_alone: the same backend's output for that prompt at concurrency 1 (the C=1 run covers every "
        "prompt any level uses)" + ("" if 1 in levels else "; not measured: 1 is not among the levels"),
        "peak_rss_mb: RSS of the generating process sampled every 20 ms during the timed loop (leaplm and hf-serve "
        "run in this process, so their numbers include the Python runtime and libraries; leaplm's model is freed "
        "before the peers run; llamacpp-server: the server process)",
        "one untimed warm-up request per backend and level; leaplm's prefix cache is reset before each timed run, "
        "peers run without prompt caching across requests (llama-server cache_prompt=false; hf-serve block "
        "sharing off)",
    ]
    if long_prompt:
        notes.append(f"'+long' rows: the same requests again, with one {long_prompt}-token prompt (the workload's "
                     "prompts one after another) arriving after half of them were submitted, on top of the C in "
                     "flight; its TTFT is long_prompt_ttft_s and itl_p99_growth_s is the other streams' ITL p99 minus "
                     "the plain row's. prefill_chunk_s: the slowest engine step prefilling one chunk of that prompt alone (the last "
                     "chunks attend to the most keys); prefill_chunk_steps_s: every chunk's step")
    if quantization:
        notes.append(f"leaplm runs {quantization} weights; llamacpp-server runs the GGUF file's own quantized "
                     "weights and hf-serve its dequantized float weights")
    return notes
