from leaplm.speculative.adaptive import DraftLength, accepted_prefix, confident


def test_draft_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    d = DraftLength(k_max=6, k_min=2)
    assert d.k == 6
    d.update(6, 1)
    d.update(5, 0)
    assert d.k == 4
    for _ in range(5):
        d.update(4, 0)
    assert d.k == 2                       # floor
    d.update(2, 2)
    assert d.k == 4
    d.update(4, 4)
    d.update(6, 6)
    assert d.k == 6                       # cap
    d.update(0, 0)
    assert d.k == 6                       # nothing drafted: nothing learnt


def test_fixed_length_does_not_move():
    d = DraftLength(5, adaptive=False)
    d.update(5, 0)
    assert d.k == 5


def test_helpers():
    assert accepted_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert accepted_prefix([1, 2], [1, 2, 3]) == 2
    assert accepted_prefix([], [1]) == 0
    assert confident(0.5, 0.4) and not confident(0.3, 0.4)
