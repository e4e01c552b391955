import os
import sys

import pytest
import torch

# tests/reference.py, the float64 oracle, is imported as `reference`.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tensors are tiny: extra intra-op threads only add
    synchronisation, which stalls badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
