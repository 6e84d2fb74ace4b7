"""Check leaplm on a CUDA device: logits against transformers, and greedy speculation against vanilla.

Run on a machine with a GPU (never part of CI, which has none):

    python scripts/gpu_check.py [--real PATH.gguf] [--dtypes float32,bfloat16] [--out FILE.json]

For every tiny random family of the test suite (tests/conftest.py) and each dtype it reports
- ``logit_err``: max |leaplm - transformers| over a 24-token prompt's logits, relative to their scale;
- ``exact[drafter]``: whether greedy output of each drafter equals vanilla greedy on a ragged batch
  (float32 must be exact; bfloat16 may diverge at near-ties because a T-token verification pass and a
  1-token decode step use different kernels — the fraction is reported, not hidden);
with ``--compile FAMILIES``, the same for the compiled decode step (``model.compile()``) of those families
(greedy rows equal to eager, drafters exact against the compiled vanilla);
and, with ``--real``, the same greedy comparison on a real model with chat prompts plus transformers'
own greedy output on the same weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaplm.cache.kv import KVCache  # noqa: E402
from leaplm.engine import Engine  # noqa: E402
from leaplm.models.load import build_model  # noqa: E402
from leaplm.sampling import SamplingParams  # noqa: E402
from leaplm.speculative.drafters import make_drafter  # noqa: E402

DRAFTERS = {
    "prompt_lookup": lambda: make_drafter("prompt_lookup"),
    "recycling": lambda: make_drafter({"method": "recycling", "node_cost": 0.0, "num_draft": 24}),
    "recycling_lookup": lambda: make_drafter({"method": "recycling", "lookup": True}),
    "aded": lambda: make_drafter("aded"),
    "recycling_merge": lambda: make_drafter({"method": "recycling", "lookup": "merge"}),
    "lookahead": lambda: make_drafter("lookahead"),
}


def _ragged_prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, vocab, (6,), generator=gen).tolist()
    return [base * 4, torch.randint(3, vocab, (9,), generator=gen).tolist() + base * 2, base[:3] * 5]


def _greedy(engine, prompts, n, drafter=None):
    params = [SamplingParams(temperature=0, max_tokens=n) for _ in prompts]
    t = time.perf_counter()
    rows = engine.start(prompts, params, drafter).run()
    return [r.output_ids for r in rows], sum(r.target_passes for r in rows), time.perf_counter() - t


def _compare(engine, prompts, n, extra_drafters=()) -> dict:
    ref, passes, secs = _greedy(engine, prompts, n)
    out = {"vanilla_passes": passes, "vanilla_s": round(secs, 3)}
    for name, make in [*DRAFTERS.items(), *extra_drafters]:
        try:
            got, p, s = _greedy(engine, prompts, n, make())
            same = sum(a == b for a, b in zip(got, ref))
            out[name] = {"exact_rows": f"{same}/{len(ref)}", "passes": p, "s": round(s, 3)}
        except Exception as e:  # report, keep checking the others
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
    return out


def check_tiny(dtype: torch.dtype, device: torch.device, compile_families: tuple = ()) -> dict:
    from tests.conftest import build_tiny, tiny_configs

    results = {}
    for name in tiny_configs():
        try:
            folder = Path(tempfile.mkdtemp(prefix=name))
            ref_model = build_tiny(name, folder).to(device=device, dtype=dtype)
            model = build_model(folder, dtype=dtype, device=device)
            ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1)).to(device)
            with torch.no_grad():
                want = ref_model(ids).logits.float()
            cache = KVCache.for_model(model.config, 1, ids.shape[1], dtype, device)
            with torch.no_grad():
                got = model(ids, torch.arange(ids.shape[1], device=device)[None], cache).float()
            err = float((got - want).abs().max() / want.abs().max())
            engine = Engine(model, eos_token_ids=[2])
            first = _greedy(engine, [ids[0].tolist()], 1)[0][0][0]
            results[name] = {"first_token_matches_hf": first == int(want[0, -1].argmax()), "logit_err": err,
                             **_compare(engine, _ragged_prompts(128), 28)}
            if name in compile_families:   # the compiled decode step: close to eager, drafters exact vs itself
                compiled = build_model(folder, dtype=dtype, device=device)
                secs = compiled.compile()
                c_engine = Engine(compiled, eos_token_ids=[2])
                got_c, _, _ = _greedy(c_engine, _ragged_prompts(128), 28)
                got_e, _, _ = _greedy(engine, _ragged_prompts(128), 28)
                results[name]["compiled"] = {"compile_s": round(secs, 1),
                                             "rows_equal_eager": sum(a == b for a, b in zip(got_c, got_e)),
                                             **_compare(c_engine, _ragged_prompts(128), 28)}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps(results[name])[:400], flush=True)
    return results


def check_real(path: Path, dtype: torch.dtype, device: torch.device, n: int = 96) -> dict:
    from leaplm.tokenizer import Tokenizer

    model = build_model(path, dtype=dtype, device=device)
    tok = Tokenizer.from_path(path)
    questions = ["Summarize the plot of Romeo and Juliet in three sentences.",
                 "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
                 "Explain why the sky is blue to a ten-year-old.",
                 "Translate to French: The weather is nice today and I want to walk in the park."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    engine = Engine(model, eos_token_ids=sorted(tok.eos_token_ids))
    out = _compare(engine, prompts, n)
    try:  # transformers' greedy on the same GGUF weights, same dtype and device
        from transformers import AutoModelForCausalLM, GgufConfig

        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                  quantization_config=GgufConfig(dequantize=True)).to(device).eval()
        ref = _greedy(engine, prompts, n)[0]
        same = 0
        for p, r in zip(prompts, ref):
            with torch.no_grad():
                g = hf.generate(torch.tensor([p], device=device), max_new_tokens=n, do_sample=False,
                                eos_token_id=sorted(tok.eos_token_ids), pad_token_id=min(tok.eos_token_ids))
            same += g[0, len(p):].tolist()[: len(r)] == r
        out["hf_greedy_equal_rows"] = f"{same}/{len(prompts)}"
    except Exception as e:
        out["hf"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, default=None, help="a real GGUF/safetensors model to check too")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--compile", default="", help="comma-separated tiny families to check compiled too (model.compile())")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run this script")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script checks the CUDA path", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        if not args.skip_tiny:
            report[f"tiny/{name}"] = check_tiny(dtype, device, tuple(f for f in args.compile.split(",") if f))
        if args.real is not None:
            try:
                report[f"real/{name}"] = check_real(args.real, dtype, device)
            except Exception as e:
                report[f"real/{name}"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            print(f"real/{name}", json.dumps(report[f"real/{name}"])[:1500], flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
