"""A drop-in accepts what torch accepts: unbatched (C, H, W) input and padding='same' with
even kernels, on every backend, against float64 torch.nn.functional with elementwise bounds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FF
from fastconv import nn as fnn
from test_reliability_numerics import BACKENDS, DEV, require

U32 = 2.0 ** -24


def _input(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV).requires_grad_()


def _check(got, ref, bound, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs()
    assert not torch.isnan(got).any(), f"{what}: NaN"
    assert (err <= bound).all(), f"{what}: error {float(err.max()):.3e} over its bound"


def _conv_case(backend, seed, c, k, kernel, padding, dilation=1, relu=True):
    require(backend)
    x = _input(seed, c, 6, 7)                      # unbatched
    w = _input(seed + 1, k, c, *kernel)
    b = _input(seed + 2, k)
    out = FF.conv2d_relu(x, w, b, padding=padding, dilation=dilation, relu=relu,
                         backend=backend)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(xd, wd, bd, padding=padding, dilation=dilation)
    ref = F.relu(ref) if relu else ref
    # each output sums c*kh*kw+1 products: gamma_n times the sum of their magnitudes
    n = c * kernel[0] * kernel[1] + 1
    mag = F.conv2d(xd.detach().abs(), wd.detach().abs(), bd.detach().abs(), padding=padding,
                   dilation=dilation)
    _check(out, ref.detach(), 2 * n * U32 * mag + 1e-30, f"{backend} output")
    g = _input(seed + 3, *out.shape).detach()
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    rx, rw, rb = torch.autograd.grad(ref, (xd, wd, bd), g.double())
    gmag = g.double().abs()
    mask = (ref > 0).double() if relu else torch.ones_like(ref)
    bx = torch.autograd.grad(F.conv2d(xd, wd.detach().abs(), None, padding=padding,
                                      dilation=dilation), xd, gmag * mask)[0].abs()
    bw = torch.autograd.grad(F.conv2d(xd.detach().abs(), wd, None, padding=padding,
                                      dilation=dilation), wd, gmag * mask)[0].abs()
    n_out = out.shape[-1] * out.shape[-2]
    _check(gx, rx, 2 * n * U32 * bx + 1e-30, f"{backend} grad input")
    _check(gw, rw, 2 * n_out * U32 * bw + 1e-30, f"{backend} grad weight")
    _check(gb, rb, 2 * n_out * U32 * (gmag * mask).sum((-1, -2)) + 1e-30, f"{backend} grad bias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_unbatched(backend):
    _conv_case(backend, 10, c=3, k=4, kernel=(3, 3), padding=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,dilation", [((2, 2), 1), ((2, 4), (2, 3)), ((4, 3), 1)])
def test_conv_same_padding_even_kernels(backend, kernel, dilation):
    _conv_case(backend, 20, c=2, k=3, kernel=kernel, padding="same", dilation=dilation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_relu_module_unbatched_same(backend):
    require(backend)
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 3, (2, 4), padding="same").to(DEV)
    fast = fnn.Conv2dReLU.from_conv(conv, relu=True, backend=backend)
    x = _input(4, 2, 5, 6)
    ref = F.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding="same"))
    mag = F.conv2d(x.double().abs(), conv.weight.double().abs(), conv.bias.double().abs(),
                   padding="same")
    _check(fast(x), ref.detach(), 2 * 9 * U32 * mag + 1e-30, f"{backend} module")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_indices", [False, True])
def test_max_pool_unbatched(backend, return_indices):
    require(backend)
    x = _input(30, 3, 7, 8)
    got = FF.max_pool2d(x, 3, 2, 1, return_indices=return_indices, backend=backend)
    xd = x.detach().double().requires_grad_()
    ref = F.max_pool2d(xd, 3, 2, 1, return_indices=return_indices)
    if return_indices:
        (got, idx), (ref, ridx) = got, ref
        assert torch.equal(idx, ridx)
    assert got.shape == (3, 4, 4)
    assert torch.equal(got.double(), ref.detach())  # a max is exact
    g = _input(31, *got.shape).detach()
    gx = torch.autograd.grad(got, x, g)[0]
    ref_gx, gmag = torch.autograd.grad(ref, xd, torch.stack((g.double(), g.double().abs())),
                                       is_grads_batched=True)[0]
    # overlapping windows add up to two gradients in float32
    _check(gx, ref_gx, 2 * U32 * gmag, f"{backend} grad input")
    pool = fnn.MaxPool2d(2, backend=backend)
    assert torch.equal(pool(x), F.max_pool2d(x, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_avg_pools_unbatched(backend):
    require(backend)
    x = _input(40, 3, 7, 8)
    xd = x.detach().double().requires_grad_()
    for name, got, ref, k in (
            ("avg_pool2d", FF.avg_pool2d(x, 3, 2, 1, backend=backend),
             F.avg_pool2d(xd, 3, 2, 1), 9),
            ("adaptive", FF.adaptive_avg_pool2d(x, (3, 5), backend=backend),
             F.adaptive_avg_pool2d(xd, (3, 5)), 12),
            ("module", fnn.AvgPool2d(2, backend=backend)(x), F.avg_pool2d(xd, 2), 4)):
        mag = {"avg_pool2d": F.avg_pool2d(xd.detach().abs(), 3, 2, 1),
               "adaptive": F.adaptive_avg_pool2d(xd.detach().abs(), (3, 5)),
               "module": F.avg_pool2d(xd.detach().abs(), 2)}[name]
        _check(got, ref.detach(), 2 * (k + 1) * U32 * mag + 1e-30, f"{backend} {name}")
        g = _input(41, *got.shape).detach()
        gx = torch.autograd.grad(got, x, g)[0]
        rx = torch.autograd.grad(ref, xd, g.double())[0]
        _check(gx, rx, 2 * (k + 1) * U32 * rx.abs().clamp_min(g.abs().max().double()) + 1e-30,
               f"{backend} {name} grad")


def test_conv_same_with_stride_still_raises_clearly():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 2, 2)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        FF.conv2d_relu(x, w, stride=2, padding="same")


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_integer_pooling_falls_back_to_torch_under_auto(op):
    """torch pools integer tensors; fastconv's kernels do not: auto runs torch and explain
    says why, an explicitly named kernel backend raises with that reason."""
    x = torch.randint(-50, 50, (2, 3, 6, 7), generator=torch.Generator().manual_seed(50))
    got = getattr(FF, op)(x, 3, 2, 1)
    assert torch.equal(got, getattr(F, op)(x, 3, 2, 1))
    text = fastconv.explain(op, x, 3, 2, 1)
    assert f"{op}: runs on 'torch'" in text and "got int64" in text
    for backend in ("extension", "triton"):
        if fastconv.dispatch.availability()[backend] is None:
            with pytest.raises(fastconv.dispatch.BackendUnavailableError, match="int64"):
                getattr(FF, op)(x, 3, 2, 1, backend=backend)
