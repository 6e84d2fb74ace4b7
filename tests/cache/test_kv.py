"""KVCache: positional writes, views, commit/rollback bookkeeping."""
import pytest
import torch

from leaplm.cache.kv import KVCache
from leaplm.errors import PromptTooLongError


def test_contiguous_and_scattered_writes_land_at_positions():
    cache = KVCache(num_layers=1, batch=2, num_kv_heads=2, head_dim=3, capacity=8)
    k = torch.randn(2, 2, 2, 3)  # [B, T, H, D]
    cache.write(0, k, k + 1, torch.tensor([[2, 3], [2, 3]]), contiguous_start=2)
    assert torch.equal(cache.k[0][:, :, 2:4], k.transpose(1, 2))
    k2 = torch.randn(2, 1, 2, 3)
    cache.write(0, k2, k2, torch.tensor([[5], [1]]), contiguous_start=None)
    assert torch.equal(cache.k[0][0, :, 5], k2[0, 0]) and torch.equal(cache.k[0][1, :, 1], k2[1, 0])
    keys, values = cache.view(0, 4)
    assert keys.shape == (2, 2, 4, 3) and torch.equal(values[:, :, 2:4], (k + 1).transpose(1, 2))


def test_commit_and_rollback_only_move_lengths():
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=1, head_dim=2, capacity=4)
    cache.commit(0, 3)
    before = cache.k[0].clone()
    cache.rollback(0, 1)
    assert cache.lengths == [1] and torch.equal(cache.k[0], before)
    with pytest.raises(ValueError):
        cache.commit(0, 5)
    with pytest.raises(ValueError):
        cache.rollback(0, -1)
    cache.commit(0, 4)      # a full cache and an empty row are both valid lengths
    cache.rollback(0, 0)
    assert cache.lengths == [0]
    cache.check_room(4)
    with pytest.raises(PromptTooLongError):
        cache.check_room(5)


def test_view_is_exactly_the_first_slots():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, head_dim=1, capacity=6)
    cache.k[0][0, 0, :, 0] = torch.arange(6.0)
    keys, _ = cache.view(0, 4)
    assert keys[0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_move_copies_slots_of_one_row_in_every_layer():
    """``move`` reads every source before writing (the compaction of an accepted tree path); the other
    rows and the slots that are no destination stay as they were."""
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=2, head_dim=1, capacity=8)
    for t in (*cache.k, *cache.v):
        t[:, :, :, 0] = torch.arange(8.0) + 10 * torch.arange(2.0)[:, None, None]   # row b, slot s -> 10b + s
    other = cache.k[0][0].clone()
    cache.move(1, [(5, 2), (7, 3), (2, 4)])   # the third source is the first destination: read before written
    for t in (*cache.k, *cache.v):
        assert t[1, 0, :, 0].tolist() == [10, 11, 15, 17, 12, 15, 16, 17]
        assert torch.equal(t[1, 0], t[1, 1])
    assert torch.equal(cache.k[0][0], other) and cache.lengths == [0, 0]
