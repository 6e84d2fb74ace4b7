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
    with pytest.raises(PromptTooLongError):
        cache.check_room(5)
