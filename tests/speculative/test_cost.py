"""Sizing a draft by expected tokens per unit of pass time (``spec.cost.best_prefix``)."""
from __future__ import annotations

import pytest

from leaplm.speculative.cost import best_prefix


def test_best_prefix_keeps_the_nodes_that_pay_for_their_pass():
    cost = [1.0, 1.1, 1.2, 1.3, 1.4]
    # gains 1.9, 2.7, 2.8, 2.85 over costs 1.1 .. 1.4: rates 1.73, 2.25, 2.15, 2.04 -> two nodes
    assert best_prefix([0.9, 0.8, 0.1, 0.05], cost) == 2
    assert best_prefix([0.05, 0.05], cost) == 0            # 1.05 / 1.1 < one token per plain step
    assert best_prefix([0.9, 0.9, 0.9, 0.9], [1.0] * 5) == 4   # free nodes: keep them all
    assert best_prefix([], cost) == 0
    # keep: the first nodes stay whatever they cost, the rest are chosen as before
    assert best_prefix([0.05, 0.05], cost, keep=1) == 1 and best_prefix([0.05, 0.05], cost, keep=2) == 2
    assert best_prefix([0.05, 0.9, 0.8, 0.1], cost, keep=1) == 3   # 2.75 / 1.3 beats 1.05 / 1.1 and 1.95 / 1.2


def test_prefix_chooser_tracks_best_prefix_node_by_node():
    from leaplm.speculative.cost import PrefixChooser

    chooser = PrefixChooser([1.0, 1.1, 1.2, 1.3, 1.4])
    for n, accept in enumerate([0.9, 0.8, 0.1, 0.05], start=1):
        chooser.add(accept)
        assert chooser.best_n == best_prefix([0.9, 0.8, 0.1, 0.05][:n], chooser.cost)
    assert chooser.best_n == 2 and chooser.since_best == 2


def test_pass_cost_follows_the_context_length():
    from leaplm.speculative.cost import PassCost

    costs = PassCost([1.0, 1.1, 1.2], [1.0, 1.3, 1.6], short_context=256, long_context=1024)
    assert costs.at(256)[1] == pytest.approx(1.1 + 0.2 * 32 / 768)    # the 256..319 bucket, at its middle
    mid = costs.at(640)
    assert 1.1 < mid[1] < 1.3 and 1.2 < mid[2] < 1.6               # in between, linearly
    far = costs.at(1800)
    assert far[1] > 1.3 and far[2] > 1.6                          # beyond the long context: extrapolated
    low = costs.at(0)
    assert low[0] == 1.0 and all(c >= 1.0 for c in low) and low == sorted(low)   # never below a plain step
    assert costs.at(650) is costs.at(640)                        # one list per 64-token bucket
    flat = PassCost([1.0, 1.2], [1.0, 1.2], 256, 256)
    assert flat.at(5000) == [1.0, 1.2]
