"""The verification-cost curve: timings for each node count, relative to the plain decode step, a plot,
and the interpolated cost table tree drafters size their trees with."""
from __future__ import annotations

from leaplm.bench.verify_curve import format_verify_curve, plot_verify_curve, verify_curve
from leaplm.models.load import build_model
from leaplm.speculative.cost import relative_cost


def test_curve_table_and_plot(tiny_model_dir, tmp_path):
    model = build_model(tiny_model_dir("llama-gqa-untied")[0])
    curve = verify_curve(model, nodes=(0, 1, 4), context=16, repeats=1)
    assert [p["nodes"] for p in curve["points"]] == [0, 1, 4]
    assert curve["points"][0]["relative"] == 1.0 and all(p["ms"] > 0 for p in curve["points"])
    assert "| 4 |" in format_verify_curve(curve)
    plot_verify_curve(curve, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_relative_cost_is_interpolated_non_decreasing_and_cached(tiny_model_dir):
    model = build_model(tiny_model_dir("qwen2-bias")[0])
    cost = relative_cost(model, 6, context=16)
    assert len(cost) == 7 and cost[0] == 1.0
    assert all(b >= a for a, b in zip(cost, cost[1:]))
    assert relative_cost(model, 6, context=16) is cost
