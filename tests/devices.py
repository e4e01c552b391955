"""The device parameter of tests whose body runs on the CPU and, where a CUDA
device is present, on it too: the same assertions on both."""
import pytest
import torch

needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
