"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs: tiny models run faster so on a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
