from __future__ import annotations

import pytest
import torch

from model_test_helpers import tiny_generator


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared 2-core machine spinning worker threads
    only slow everyone down. Restored afterwards so that other test directories keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_gen():
    """Shared and read-only: a test that changes a generator builds its own."""
    return tiny_generator(0)
