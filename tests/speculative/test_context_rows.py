"""ContextRows: n-gram keyed candidate rows, with settledness levels, prompt seeding and bounded slots."""
from __future__ import annotations

import numpy as np
import pytest

from leaplm.speculative.context_rows import SEEDED, ContextRows, gram_hash, gram_hashes, settle


def test_vector_and_scalar_hashes_agree():
    grams = np.array([[0, 0], [1, 2], [2, 1], [151_000, 7]])
    assert gram_hashes(grams).tolist() == [gram_hash(g) for g in grams.tolist()]
    assert len(set(gram_hashes(grams).tolist())) == 4          # order matters


def _get(t, gram):
    return t.get(gram_hash(gram[-t.order:])) if len(gram) >= t.order else None


def _put(t, grams, candidates):
    t.put(gram_hashes(np.asarray(grams)), np.asarray(candidates))


def test_put_get_and_levels():
    t = ContextRows(order=2, top_k=3, slots=64)
    assert _get(t, [1, 2]) is None
    _put(t, [[1, 2], [3, 4]], [[5, 6, 7], [8, -1, -1]])
    row, level = _get(t, [9, 9, 1, 2])                          # the last two tokens key the row
    assert row.tolist() == [5, 6, 7] and level == 0
    assert _get(t, [2, 1]) is None and _get(t, [2]) is None
    _put(t, [[1, 2]], [[5, 7, 6]])           # same best candidate: one level up
    assert _get(t, [1, 2])[1] == 1
    for _ in range(5):
        _put(t, [[1, 2]], [[5, 7, 6]])
    assert _get(t, [1, 2])[1] == t.levels - 1                   # capped
    _put(t, [[1, 2]], [[6, 5, 7]])           # a new best candidate: level 0
    assert _get(t, [1, 2])[1] == 0


def test_seed_records_what_followed_each_gram_and_the_model_replaces_it():
    t = ContextRows(order=2, top_k=2, slots=64)
    t.seed([1, 2, 3, 1, 2, 4])
    row, level = _get(t, [1, 2])
    assert row.tolist() == [4, -1] and level == SEEDED         # the latest occurrence wins
    assert _get(t, [2, 3])[0].tolist() == [1, -1]
    assert _get(t, [2, 4]) is None                                # the last gram has no continuation yet
    _put(t, [[1, 2]], [[4, 3]])
    row, level = _get(t, [1, 2])
    assert row.tolist() == [4, 3] and level == 0                # the model's candidates, not yet settled


def test_slots_are_bounded_and_a_replaced_gram_is_not_returned():
    t = ContextRows(order=2, top_k=1, slots=4)
    grams = np.array([[i, i + 1] for i in range(50)])
    _put(t, grams, np.arange(50)[:, None])
    assert t.nbytes == 4 * 8 + 4 * 4 + 4
    found = [g for g in grams.tolist() if _get(t, g) is not None]
    assert 1 <= len(found) <= 4
    assert all(_get(t, g)[0][0] == g[0] for g in found)           # what is returned belongs to the gram
    with pytest.raises(ValueError, match="power of two"):
        ContextRows(order=2, top_k=1, slots=6)


def test_extending_a_hash_token_by_token_gives_the_gram_s_hash():
    from leaplm.speculative.context_rows import extend_hash

    h = 0
    for t in [4, 8, 15, 16]:
        h = extend_hash(h, t)
    assert h == gram_hash([4, 8, 15, 16]) == int(gram_hashes(np.array([[4, 8, 15, 16]]))[0])


def test_settle_counts_kept_best_candidates_up_to_a_cap():
    level = np.array([0, 2, 3, 1], dtype=np.int8)
    out = settle(level, np.array([True, True, True, False]), levels=4)
    assert out.tolist() == [1, 3, 3, 0] and out.dtype == np.int8
