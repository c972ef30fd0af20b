"""Test-wide set-up.

Without a CUDA device the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which
must be set before Triton is imported; that is why it happens here, first. Every output a
kernel must write is poisoned (NaN) first, in the Triton backend and the extension alike
(``FASTCONV_POISON_OUTPUTS=1``), so an element a kernel forgets fails the test that reads it.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTCONV_POISON_OUTPUTS"] = "1"

# auto's measured choice depends on timing: tests that want it turn it on with a fake timer
os.environ.setdefault("FASTCONV_AUTOTUNE", "0")

import pytest  # noqa: E402

import support  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Interpreter tile sizes that split every test plane into several tiles, chunks and channel
# blocks, as the GPU splits large layers: a tile-boundary bug shows on tiny shapes.
_SMALL_TILES = {
    "max_pool2d": {"tile": 256, "bwd_tile": 128, "max_cols": 4, "nchw_max_cols": 8,
                   "num_warps": 4},
    "avg_pool2d": {"tile": 256, "bwd_tile": 128, "max_cols": 4, "nchw_max_cols": 8,
                   "num_warps": 4},
    "batch_norm": {"tile": 64, "reduce_tile": 32, "max_channel_block": 4, "programs_per_sm": 24,
                   "num_warps": 4, "reduce_warps": 4, "fused_elements": 0, "min_chunk_tiles": 1,
                   "max_chunks": 1 << 20},
}


def _triton(op):
    try:
        return support.triton_module(op)
    except Exception:  # triton missing: the Triton tests skip themselves
        return None


@pytest.fixture(autouse=True, scope="session")
def _poison_triton_outputs():
    # triton/utils.py reads the env var at import; set it too in case it was imported first
    utils = _triton("utils")
    if utils is not None:
        utils.POISON_OUTPUTS = True
    yield


@pytest.fixture(scope="session")
def built_extension():
    """The C++ extension built (first run: minutes, then cached) and loaded; skipped only
    where the machine has no toolchain (a build that fails with one is a failure)."""
    from fastconv.backends import extension

    problem = extension._toolchain_problem()
    try:
        extension.build()
    except extension.ExtensionBuildError as exc:
        if problem:
            pytest.skip(f"no toolchain to build the extension: {problem}")
        pytest.fail(f"the extension failed to build: {exc}")


@pytest.fixture
def small_tiles(monkeypatch):
    """Small Triton interpreter tiles (CPU only; the GPU keeps its tuning)."""
    if HAS_CUDA:
        return
    for op, tiles in _SMALL_TILES.items():
        mod = _triton(op)
        if mod is not None:
            monkeypatch.setitem(mod.TUNING, "cpu", dict(tiles))
    bn = _triton("batch_norm")
    if bn is not None:
        monkeypatch.setattr(bn, "_FINALIZE_BLOCK_K", 4)
        monkeypatch.setattr(bn, "_FINALIZE_BLOCK_C", 4)


@pytest.fixture
def no_tf32(monkeypatch):
    """float32 convolutions stay float32 on a GPU: the float32 bounds assume it."""
    if HAS_CUDA:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


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
