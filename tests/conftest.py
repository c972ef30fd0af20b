"""Test-wide set-up.

Without a CUDA device the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which
must be set before Triton is imported; that is why it happens here, first.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's measured choice depends on timing: tests that want it turn it on with a fake timer
os.environ.setdefault("FASTCONV_AUTOTUNE", "0")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_selection():
    """Each test starts with no remembered choices (tests swap backends and the auto order)."""
    from fastconv import selection

    selection.reset()
    yield
    selection.reset()


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: with tiny shapes a second OpenMP thread costs more
    than it gives, and stalls when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
