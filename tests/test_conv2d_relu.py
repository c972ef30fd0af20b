"""conv2d_relu on every kernel backend and device against float64: output and the gradients of
input, weight and bias, elementwise within gamma(length) * the float64 sum of |terms|
(tests/support.py). Varied: bias present/absent with relu on and off, groups (depthwise too),
dilation, stride, padding beyond the kernel's reach, rectangular and odd geometry, both memory
formats, output planes of 64 elements and more, float16/float64 where served.
"""
import math

import pytest
import torch

import fastconv
import support
from support import assert_layout, assert_within

pytestmark = pytest.mark.usefixtures("no_tf32")


def make(shape, out_channels, kernel, groups, dtype, device, bias, channels_last, seed):
    gen = support.generator("conv2d_relu", shape, out_channels, kernel, groups, dtype, bias,
                            channels_last, seed)
    kh, kw = support.pair(kernel)
    cin = shape[1] // groups
    x = support.randn(shape, gen, dtype, device)
    w = support.randn((out_channels, cin, kh, kw), gen, dtype, device,
                      scale=1 / math.sqrt(cin * kh * kw))
    b = support.randn((out_channels,), gen, dtype, device) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b, gen


def check(backend, x, w, b, gen, geo, relu, what):
    probe = torch.nn.functional.conv2d(x, w, b, **geo)
    g = support.grad_for(probe.shape, gen, x.dtype, x.device)
    a = dict(input=x, weight=w, bias=b, relu=relu, **geo)
    try:
        out, _, grads, _ = support.run("conv2d_relu", a, backend, g)
    except fastconv.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert out.dtype == x.dtype and out.stride() == probe.stride(), \
        f"{what}: output strides {out.stride()}, torch's {probe.stride()}"
    ref = support.conv_reference(x, w, b, geo["stride"], geo["padding"], geo["dilation"],
                                 geo["groups"], relu, out, g)
    assert_within(out, *ref["output"], f"{what} output")
    assert_layout(grads["input"], x, f"{what} grad_input")
    for name, got in grads.items():
        assert_within(got, *ref[name], f"{what} grad {name}")


# (id, (N, C, H, W), out_channels, kernel, stride, padding, dilation, groups, bias, relu)
CASES = [
    ("bias relu=False 8x8 out", (2, 3, 10, 10), 4, 3, 1, 0, 1, 1, True, False),
    ("bias relu 8x8 out", (2, 3, 8, 8), 5, 3, 1, 1, 1, 1, True, True),
    ("no bias relu=False", (2, 3, 8, 9), 4, 3, 1, 1, 1, 1, False, False),
    ("no bias relu", (2, 3, 5, 4), 5, (2, 3), 1, 0, 1, 1, False, True),
    ("alexnet 11x11 s4 C=1", (2, 1, 27, 27), 6, 11, 4, 1, 1, 1, True, True),
    ("lenet 5x5 p2", (2, 1, 12, 12), 6, 5, 1, 2, 1, 1, True, True),
    ("resnet 1x1 s2", (2, 8, 7, 7), 8, 1, 2, 0, 1, 1, True, False),
    ("dilation 2", (2, 4, 9, 9), 4, 3, 1, 2, 2, 1, True, True),
    ("stride 3 dilation 2", (2, 4, 11, 11), 4, 3, 3, 1, 2, 1, True, False),
    ("odd geometry", (3, 5, 7, 5), 7, (3, 2), (2, 1), (1, 0), (2, 1), 1, True, True),
    ("groups 2", (2, 8, 6, 6), 8, 3, 1, 1, 1, 2, True, True),
    ("groups 3 relu=False", (2, 6, 5, 7), 9, 3, 1, 1, 1, 3, True, False),
    ("depthwise", (2, 8, 5, 5), 8, 3, 1, 1, 1, 8, False, True),
    ("1x1 pad 1 (padding beyond the kernel)", (2, 4, 5, 5), 4, 1, 1, 1, 1, 1, True, True),
    ("3x3 pad 3", (2, 4, 4, 5), 4, 3, 1, 3, 1, 1, True, False),
    ("7x7 pad 3 (more than 31 taps)", (2, 4, 6, 6), 4, 7, 1, 3, 1, 1, True, True),
]


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv2d_relu(case, channels_last, bd):
    name, shape, k, kernel, s, p, d, groups, bias, relu = case
    backend, device = bd
    support.require(backend, device)
    x, w, b, gen = make(shape, k, kernel, groups, torch.float32, device, bias, channels_last, 0)
    geo = dict(stride=support.pair(s), padding=support.pair(p), dilation=support.pair(d),
               groups=groups)
    check(backend, x, w, b, gen, geo, relu, f"{backend} {name}")


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes(dtype, bd):
    backend, device = bd
    support.require(backend, device)
    for bias, relu in ((True, False), (False, True)):
        x, w, b, gen = make((2, 4, 8, 8), 6, 3, 1, dtype, device, bias, False, relu)
        geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
        check(backend, x, w, b, gen, geo, relu, f"{dtype} bias={bias} relu={relu}")


@pytest.mark.parametrize("bd", support.backend_params())
def test_sliced_input(bd):
    backend, device = bd
    support.require(backend, device)
    x, w, b, gen = make((2, 7, 8, 11), 5, 3, 1, torch.float32, device, True, False, 0)
    x = x[:, 1:6, :, ::2]  # not contiguous in any format
    w = w[:, :5].contiguous()
    geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    check(backend, x, w, b, gen, geo, True, "sliced")


def test_torch_backend_is_routed_and_matches_float64():
    x, w, b, gen = make((2, 3, 10, 10), 4, 3, 1, torch.float32, "cpu", True, False, 0)
    assert fastconv.functional.backend_for("conv2d_relu", x, w, b, relu=False,
                                           backend="torch") == "torch"
    out = fastconv.functional.conv2d_relu(x, w, b, relu=False, backend="torch")
    assert torch.equal(out, torch.nn.functional.conv2d(x, w, b))
    ref = support.conv_reference(x, w, b, (1, 1), (0, 0), (1, 1), 1, False, out, None)
    assert_within(out, *ref["output"], "torch output")


# Edge shapes (moved from test_reliability_numerics.py): batch 0, 1x1 spatial, outputs of size 1,
# very wide channels, odd geometry and groups. make_case's random arguments, checked by
# support.check_against_reference (every element within its bound).
EDGE_CASES = [
    ("conv batch0", "conv2d_relu", (0, 3, 5, 5), dict(out_channels=4, kernel=(3, 3), padding=1)),
    ("conv 1x1 spatial", "conv2d_relu", (2, 6, 1, 1), dict(out_channels=5, kernel=(1, 1))),
    ("conv 1x1 spatial 3x3 pad1", "conv2d_relu", (2, 4, 1, 1),
     dict(out_channels=3, kernel=(3, 3), padding=1)),
    ("conv output 1x1 (kernel = input)", "conv2d_relu", (2, 3, 5, 5),
     dict(out_channels=4, kernel=(5, 5))),
    ("conv output 1x1 (stride > input)", "conv2d_relu", (2, 3, 6, 6),
     dict(out_channels=4, kernel=(3, 3), stride=4)),
    ("conv wide in-channels", "conv2d_relu", (2, 1024, 2, 2),
     dict(out_channels=3, kernel=(1, 1))),
    ("conv wide out-channels", "conv2d_relu", (1, 3, 3, 3),
     dict(out_channels=1000, kernel=(3, 3), padding=1)),
    ("conv odd geometry", "conv2d_relu", (3, 5, 7, 5),
     dict(out_channels=7, kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1))),
    ("conv odd groups no relu", "conv2d_relu", (2, 6, 5, 7),
     dict(out_channels=9, kernel=(3, 3), groups=3, padding=1, relu=False)),
]


@pytest.mark.parametrize("bd", support.backend_params(support.BACKENDS))
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_shapes(case, bd):
    name, op, shape, params = case
    backend, device = bd
    support.require(backend, device)
    args = support.make_case(op, shape, device=device, **dict(params))
    support.check_against_reference(op, args, backend, what=f"{backend} {name}")
