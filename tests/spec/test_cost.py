"""Sizing a draft by expected tokens per unit of pass time (``spec.cost.best_prefix``)."""
from __future__ import annotations

from leaplm.spec.cost import best_prefix


def test_best_prefix_keeps_the_nodes_that_pay_for_their_pass():
    cost = [1.0, 1.1, 1.2, 1.3, 1.4]
    # gains 1.9, 2.7, 2.8, 2.85 over costs 1.1 .. 1.4: rates 1.73, 2.25, 2.15, 2.04 -> two nodes
    assert best_prefix([0.9, 0.8, 0.1, 0.05], cost) == 2
    assert best_prefix([0.05, 0.05], cost) == 0            # 1.05 / 1.1 < one token per plain step
    assert best_prefix([0.9, 0.9, 0.9, 0.9], [1.0] * 5) == 4   # free nodes: keep them all
    assert best_prefix([], cost) == 0
