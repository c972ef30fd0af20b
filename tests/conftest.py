"""Test-wide set-up.

Without a CUDA device the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which
must be set before Triton is imported; that is why it happens here, first.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")

