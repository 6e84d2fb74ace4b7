"""Fixtures of the speculation tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: tiny tensors gain nothing from more, and on a busy machine two threads
    made loops of small ops ~50x slower (measured: a 6000-verdict chi-square test 0.7 s -> 46 s; OpenMP's
    barriers wait on a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
