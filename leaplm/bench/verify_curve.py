"""What one verification pass costs as the draft grows: ``leaplm profile --verify-curve``.

Speculation pays when a pass over ``1 + n`` tokens costs little more than a pass over one. On a GPU
that holds up to dozens of tokens; on a CPU the matmuls become compute-bound much sooner. This
module times the target's tree pass (tree attention, ``n`` draft nodes as a random tree after a
``context``-token prompt) for a range of node counts, so node budgets (``num_draft`` of tree and
chain drafters) can be chosen from measurement: the useful budget is where the expected accepted
length per pass grows faster than the cost.

``verify_curve(model) -> {"context": L, "points": [{"nodes": n, "ms": t, "relative": t / t0}, ...]}``
(``t0``: the one-token pass); ``plot_verify_curve(curve, path)`` draws ms vs nodes.
"""
from __future__ import annotations

import torch

from ..speculative.cost import time_tree_pass

DEFAULT_NODES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def verify_curve(model, nodes=DEFAULT_NODES, context: int = 512, repeats: int = 5) -> dict:
    ms = time_tree_pass(model, nodes, context=context, repeats=repeats)
    points = [{"nodes": n, "ms": t, "relative": t / ms[0]} for n, t in zip(nodes, ms)]
    return {"context": context, "threads": torch.get_num_threads(), "device": str(model.device), "points": points}


def format_verify_curve(curve: dict) -> str:
    lines = [f"verification pass after a {curve['context']}-token context ({curve['device']}, "
             f"{curve['threads']} threads; median of repeats)", "",
             "| draft nodes | ms / pass | × one-token pass |", "|---|---|---|"]
    lines += [f"| {p['nodes']} | {p['ms']:.1f} | {p['relative']:.2f} |" for p in curve["points"]]
    return "\n".join(lines)


def plot_verify_curve(curve: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["nodes"] for p in curve["points"]]
    ys = [p["ms"] for p in curve["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o")
    ax.axhline(ys[0] * 2, color="grey", linestyle="--", linewidth=0.8, label="2 × one-token pass")
    ax.set_xlabel("draft tree nodes verified in one pass")
    ax.set_ylabel("ms per target pass")
    ax.set_title(title or f"verification cost vs nodes (context {curve['context']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
