"""Acceptance by depth and drafter cost of a trained draft head: EAGLE, Medusa or Kangaroo (issue 25's table).

    .venv/bin/python scripts/head_stats.py -m smollm2-135m-instruct --head heads/smollm2-eagle --limit 2
    .venv/bin/python scripts/head_stats.py -m qwen2.5-coder-1.5b-instruct --method medusa --head heads/qwen-medusa \
        --workload humaneval --limit 20

The prompts are ``leaplm bench``'s (``--workload``, ``--limit`` per category), first turns only. Greedy, int8,
batch 1 (one prompt at a time). Prints, as JSON: the fraction of verified drafts whose accepted path
reached each depth, the mean tokens per target pass, and the drafter's time per draft against the target's time per
verification pass (the drafter cost as a fraction of a target step). Not a speed benchmark: use ``leaplm bench``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from leaplm import LLM, SamplingParams
    from leaplm.bench.workloads import load_workload
    from leaplm.speculative.drafters import DRAFTERS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--head", required=True)
    p.add_argument("--method", default="eagle", choices=("eagle", "medusa", "kangaroo"), help="the head's kind")
    p.add_argument("--workload", default="spec_bench", help="a leaplm bench workload (default spec_bench)")
    p.add_argument("--limit", type=int, default=2, help="samples per category (default 2)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--knobs", default="{}", help="JSON of the drafter's knobs, e.g. '{\"depth\": 6}'")
    args = p.parse_args()

    prompts = [[{"role": "user", "content": sample.turns[0]}]
               for sample in load_workload(args.workload, args.limit).samples]
    eagle = DRAFTERS[args.method](args.head, **json.loads(args.knobs))
    llm = LLM(args.model, quantization="int8", speculative=eagle)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    outs = [llm.chat([m], params, use_tqdm=False)[0] for m in prompts]   # one at a time: batch 1
    passes = sum(o.metrics["target_passes"] for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    draft_s = sum(o.metrics["draft_s"] for o in outs)
    verify_s = sum(o.metrics["verify_s"] for o in outs)
    drafts = sum(eagle.accepted_hist)
    print(json.dumps({
        "model": args.model, "method": args.method, "head": args.head, "prompts": len(prompts), "output_tokens": tokens,
        "tokens_per_pass": round(tokens / passes, 3),
        "acceptance_by_depth": [round(a, 3) for a in eagle.acceptance_by_depth()],
        "accepted_hist": eagle.accepted_hist,
        "draft_ms_per_draft": round(1000 * draft_s / max(1, drafts), 2),
        "verify_ms_per_pass": round(1000 * verify_s / max(1, passes), 2),
        "draft_cost_fraction": round((draft_s / max(1, drafts)) / (verify_s / max(1, passes)), 3),
        "head_training": json.loads((Path(args.head) / "config.json").read_text()).get("training", {}),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
