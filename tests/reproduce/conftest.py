"""One torch thread for the recipe tests: on a shared 2-core machine two spinning threads per
process cost far more than they gain for toyworld-sized models (these tests check structure and
step bookkeeping, not numbers that could depend on the thread count)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
