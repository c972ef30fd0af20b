"""Bitwise reproducibility of every backward, on every backend.

Under ``torch.use_deterministic_algorithms(True)`` each op's forward and backward run twice on
the same inputs and must agree bit for bit (outputs, every gradient, running statistics), or
raise the RuntimeError torch raises for an op it has no deterministic kernel for (torch's
CUDA adaptive_avg_pool2d backward). fastconv's own kernels use no atomics at all (see
docs/RELIABILITY.md), so they must also give the same bits with the mode off, and a converted
model's training step must be reproducible as a whole.

Shapes are big enough to take the kernels' parallel paths: several OpenMP chunks on CPU (two
threads), split-K weight-gradient slices and multi-chunk batch-norm reductions in Triton.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastconv
from fastconv import models
from support import (BACKENDS, DEV, HAS_CUDA, call, grad_like, make_case,
                     require)

pytestmark = pytest.mark.usefixtures("no_tf32")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def require_run_to_run(backend: str) -> None:
    """``require``, and a backend whose runs could differ: the Triton interpreter runs a
    kernel's programs one after another in numpy, so two runs agree by construction (40 s of
    the suite for nothing); the GPU run checks Triton's."""
    require(backend)
    if backend == "triton" and DEV.type == "cpu":
        pytest.skip("the Triton interpreter is sequential: reproducible by construction "
                    "(checked on a GPU)")


@pytest.fixture(autouse=True)
def two_threads(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # the extension's CPU kernels split work by thread count
    # cuBLAS (the Linear layers) refuses deterministic mode without a fixed workspace
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def deterministic(flag: bool = True):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def _cases():
    """(id, op, input shape, params)."""
    n = 8
    return [
        ("conv 3x3", "conv2d_relu", (n, 8, 12, 12), dict(out_channels=16, kernel=(3, 3),
                                                         padding=1)),
        ("conv 11x11 s4 C=1", "conv2d_relu", (n, 1, 35, 35),
         dict(out_channels=8, kernel=(11, 11), stride=4, padding=1)),
        ("conv 1x1 groups", "conv2d_relu", (n, 8, 7, 7),
         dict(out_channels=8, kernel=(1, 1), groups=2, relu=False)),
        ("maxpool 3/2 relu", "max_pool2d", (n, 8, 13, 13), dict(kernel_size=3, stride=2,
                                                               relu=True)),
        ("maxpool indices", "max_pool2d", (n, 8, 13, 13),
         dict(kernel_size=3, stride=2, padding=1, return_indices=True)),
        ("avgpool 3/2/1", "avg_pool2d", (n, 8, 13, 13), dict(kernel_size=3, stride=2, padding=1)),
        ("adaptive", "adaptive_avg_pool2d", (n, 8, 13, 11), dict(output_size=(3, 4))),
        ("bn train relu", "batch_norm", (n, 8, 12, 12), dict(training=True, relu=True)),
        ("bn train nhwc", "batch_norm", (n, 8, 12, 12),
         dict(training=True, channels_last=True)),
        ("bn eval", "batch_norm", (n, 8, 12, 12), dict(training=False, relu=True)),
    ]


def _run(op, args, backend, g):
    out, idx, grads, stats = call(op, args, backend, g)
    return dict(out=out, idx=idx, **{f"grad {k}": v for k, v in grads.items()},
                **{k: v for k, v in stats.items()})


def _bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None:
            assert b[k] is None
            continue
        # bit patterns, so that -0.0 vs 0.0 or two NaN payloads count as different
        x, y = a[k].detach().contiguous(), b[k].detach().contiguous()
        if x.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            x, y = x.view(bits), y.view(bits)
        assert torch.equal(x, y), f"{what}: {k} differs between two identical runs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_reproducible(backend):
    require_run_to_run(backend)
    for name, op, shape, params in _cases():
        args = make_case(op, shape, **dict(params))
        probe, *_ = call(op, args, "torch")
        g = grad_like(probe)
        with deterministic(True):
            try:
                first = _run(op, args, backend, g)
            except RuntimeError as exc:
                # torch raises for backward passes it has no deterministic CUDA kernel for
                # (adaptive_avg_pool2d); fastconv's own kernels never need to
                if backend == "torch" and DEV.type == "cuda" and "determinis" in str(exc):
                    continue
                raise
            second = _run(op, args, backend, g)
        _bitwise_equal(first, second, f"{backend} {name} (deterministic mode)")
        if backend != "torch":
            # no atomics anywhere in fastconv's kernels: the mode changes nothing
            with deterministic(False):
                third = _run(op, args, backend, g)
            _bitwise_equal(first, third, f"{backend} {name} (deterministic mode off)")


def _model_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_model_training_is_bitwise_reproducible(backend):
    """Two SGD steps of a converted LeNet-BN (conv, BN+ReLU, pools, Linear) from the same
    state give bit-identical parameters and running statistics."""
    require_run_to_run(backend)
    torch.manual_seed(0)
    stock = models.lenet_bn().to(DEV)
    batch = 16
    x = torch.randn(batch, 1, 28, 28, device=DEV)
    y = torch.randint(0, 10, (batch,), device=DEV)
    with deterministic(True):
        runs = [_model_step(fastconv.convert(stock, backend=backend), x, y) for _ in range(2)]
    _bitwise_equal(runs[0], runs[1], f"{backend} lenet_bn training")


@requires_cuda
def test_no_autotuning_in_deterministic_mode(monkeypatch):
    require("triton")
    from fastconv.backends.triton import autotune
    from fastconv.backends.triton import conv2d_relu as conv
    calls = []
    monkeypatch.setattr(autotune, "tune", lambda *a, **k: calls.append(1) or (None, None))
    conv._PLANS.clear()
    monkeypatch.setattr(conv._TABLE, "_mem", {})
    monkeypatch.setattr(conv._TABLE, "_user", {})
    monkeypatch.setattr(conv._TABLE, "_shipped", {})
    autotune.set_enabled(True)
    try:
        with deterministic(True):
            args = make_case("conv2d_relu", (4, 16, 20, 20), out_channels=32, kernel=(3, 3),
                             padding=1)
            call("conv2d_relu", args, "triton", torch.randn(4, 32, 20, 20, device=DEV))
    finally:
        autotune.set_enabled(None)
    assert not calls, "autotuning ran under torch.use_deterministic_algorithms(True)"
