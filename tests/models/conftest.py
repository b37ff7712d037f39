"""Tiny models run faster on one intra-op thread: with two, synchronisation
dominates and a busy 2-core machine made these tests ~100x slower."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
