"""Contract tests run tiny models: one intra-op thread is faster than several on a busy CI machine."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _contract_one_thread(one_thread):
    yield
