"""Where decode time goes, and what bounds it: ``leaplm profile``.

At batch 1 a decode step multiplies one activation vector by every weight matrix, so it must read
all weights once per token; the ceiling is ``memory bandwidth / weight bytes per token``.
This module measures the three numbers that comparison needs, on the machine it runs on:

- ``weight_bytes_per_token(model)``: bytes of every matrix a decode step reads (embedding lookup
  excluded — one row; a tied lm_head counts the embedding once),
- ``measure_bandwidth()``: sustained read bandwidth of a large fp32 matrix-vector product and of a
  plain reduction (GB/s, best of several runs),
- ``profile_decode(model)``: decode tokens/s and the split of the decode wall time between matmuls
  (fp32 and fbgemm int8), attention, other operators (torch.profiler, self CPU time by operator) and
  the time between operators (Python, dispatch: wall time no operator accounts for).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..engine import Engine
from ..sampling import SamplingParams

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
              "quantized::linear_dynamic",   # fbgemm's int8 GEMM (quant/int8.py)
              "leaplm_native::int8_linear", "leaplm_native::int4_linear")   # the compiled step's (native/)
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "leaplm_native::attend")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: float parameters, plus int8 projections (``Int8Linear``:
    int8 weights and float32 per-channel scales) and int4 ones
    (``Int4Linear``: packed nibbles and float16 scale and minimum per group of 32)."""
    from ..quant.linear import QuantizedLinear

    total = 0
    for name, p in model.named_parameters():
        if name == "embed" and model.lm_head is not None:
            continue  # untied or quantized head: the embedding is a row lookup
        if p.dim() == 2 or name.endswith("bias") or "norm" in name:
            total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.weight_bytes()
    return total


def measure_bandwidth(size_mb: int = 512, repeats: int = 5) -> dict:
    """Best-of-``repeats`` read bandwidth (GB/s) for a reduction and a fp32 mat-vec of ``size_mb``."""
    cols = 4096
    rows = size_mb * 1024 * 1024 // 4 // cols
    w = torch.randn(rows, cols)
    x = torch.randn(1, cols)
    nbytes = w.numel() * 4

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    return {"reduction_gb_s": best(lambda: w.sum()), "matvec_gb_s": best(lambda: F.linear(x, w)),
            "buffer_mb": size_mb, "threads": torch.get_num_threads()}


def profile_decode(model, tokens: int = 32, prompt_len: int = 64) -> dict:
    """Greedy decode of ``tokens`` tokens after a ``prompt_len`` prompt; time split by operator kind."""
    engine = Engine(model)
    prompt = list(range(100, 100 + prompt_len))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    walls = []

    def run(profiler=None) -> float:
        batch = engine.start([prompt], [params])
        batch.step()  # prefill, not timed
        start = time.perf_counter()
        while not batch.done:
            batch.step()
            if profiler is not None:
                profiler.step()
        walls.append(time.perf_counter() - start)
        return (tokens - 1) / walls[-1]

    run()  # warm-up
    tokens_per_s = max(run(), run())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            continue
        us = event.self_cpu_time_total
        if any(event.key.startswith(op) for op in MATMUL_OPS):
            split["matmul"] += us
        elif any(op in event.key for op in ATTENTION_OPS):
            split["attention"] += us
        else:
            split["other"] += us
    # what no operator accounts for: Python, dispatch and sampling between ops (of the profiled run's wall time)
    split["python"] = max(0.0, walls[-1] * 1e6 - sum(split.values()))
    total = sum(split.values()) or 1.0
    return {"tokens_per_s": tokens_per_s, "ms_per_token": 1000 / tokens_per_s,
            "time_split": {k: v / total for k, v in split.items()}}


def roofline(model) -> dict:
    bw = measure_bandwidth()
    prof = profile_decode(model)
    nbytes = weight_bytes_per_token(model)
    achieved = nbytes * prof["tokens_per_s"] / 1e9
    return {
        **prof,
        "weight_mb_per_token": nbytes / 1e6,
        "achieved_gb_s": achieved,
        "bandwidth": bw,
        "ceiling_tokens_per_s": bw["matvec_gb_s"] * 1e9 / nbytes,
        "fraction_of_matvec_bandwidth": achieved / bw["matvec_gb_s"],
    }


def format_roofline(name: str, r: dict) -> str:
    s = r["time_split"]
    return "\n".join([
        "| model | tok/s | ms/token | weights read/token | achieved | mat-vec bandwidth | reduction bandwidth | ceiling | time: matmul / attention / other ops / between ops |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {name} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['weight_mb_per_token']:.0f} MB "
        f"| {r['achieved_gb_s']:.1f} GB/s ({100 * r['fraction_of_matvec_bandwidth']:.0f}%) "
        f"| {r['bandwidth']['matvec_gb_s']:.1f} GB/s | {r['bandwidth']['reduction_gb_s']:.1f} GB/s "
        f"| {r['ceiling_tokens_per_s']:.1f} tok/s "
        f"| {100 * s['matmul']:.0f}% / {100 * s['attention']:.0f}% / {100 * s['other']:.0f}% "
        f"/ {100 * s.get('python', 0.0):.0f}% |",
    ])
