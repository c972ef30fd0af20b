"""avg_pool2d and adaptive_avg_pool2d on every kernel backend and device against float64:
output and grad_input elementwise within the bound of a window sum and one division
(tests/support.py). Varied: padding counted or not, ceil_mode and its last windows,
divisor_override, uneven and growing adaptive windows, both memory formats, output planes of
64 elements and more, float16/float64 where served.
"""
import pytest
import torch

import fastconv
import support
from support import assert_layout, assert_within

pytestmark = pytest.mark.usefixtures("small_tiles")


def check(backend, op, x, params, what):
    gen = support.generator(op, "grad", what)
    probe = getattr(support.REF, op)(x, **params)
    g = support.grad_for(probe.shape, gen, x.dtype, x.device)
    try:
        out, _, grads, _ = support.run(op, dict(params, input=x), backend, g)
    except fastconv.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    ref = support.avg_pool_reference(op, x, params, g)
    assert out.dtype == x.dtype
    assert_layout(out, x, f"{what} output")
    assert_within(out, *ref["output"], f"{what} output")
    assert_layout(grads["input"], x, f"{what} grad_input")
    assert_within(grads["input"], *ref["input"], f"{what} grad_input")


def params(k, s, p, ceil, cip, div):
    return dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil, count_include_pad=cip,
                divisor_override=div)


# (id, shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    ("lenet 2/2 8x8 out", (2, 3, 16, 17), 2, 2, 0, False, True, None),
    ("3/1/1 pad counted 8x8 out", (1, 2, 8, 8), 3, 1, 1, False, True, None),
    ("lenet 2/2 odd", (2, 3, 7, 9), 2, 2, 0, False, True, None),
    ("3/2/1 ceil, pad excluded", (1, 3, 9, 10), 3, 2, 1, True, False, None),
    ("3/2/1 ceil, pad counted", (1, 3, 9, 10), 3, 2, 1, True, True, None),
    ("odd ceil rect", (2, 3, 11, 9), (3, 2), (2, 3), (1, 1), True, True, None),
    ("divisor_override", (1, 2, 7, 8), (3, 2), (1, 2), (1, 1), False, True, 5),
]


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", AVG_CASES, ids=[c[0] for c in AVG_CASES])
def test_avg_pool2d(case, channels_last, bd):
    name, shape, *geo = case
    backend, device = bd
    support.require(backend, device)
    x = support.randn(shape, support.generator("avg_pool2d", case), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(backend, "avg_pool2d", x, params(*geo), f"{backend} {name}")


ADAPTIVE_CASES = [
    ("resnet 7x7 -> 1", (2, 4, 7, 7), (1, 1)),
    ("12x12 -> 1 (run-time loops)", (1, 3, 12, 12), (1, 1)),
    ("17x16 -> 8x8", (1, 2, 17, 16), (8, 8)),
    ("9x11 -> 3x4", (1, 3, 9, 11), (3, 4)),
    ("9x11 -> 4x3", (1, 3, 9, 11), (4, 3)),
    ("5x6 -> 7x9 (upsampling)", (1, 2, 5, 6), (7, 9)),
    ("None keeps a dimension", (1, 2, 6, 5), (None, 2)),
    ("nin 5x5 -> 1", (2, 4, 5, 5), (1, 1)),
    ("googlenet 3x3 -> 1", (2, 4, 3, 3), (1, 1)),
    ("8x8 -> 2x2", (1, 3, 8, 8), (2, 2)),
]


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=[c[0] for c in ADAPTIVE_CASES])
def test_adaptive_avg_pool2d(case, channels_last, bd):
    name, shape, size = case
    backend, device = bd
    support.require(backend, device)
    x = support.randn(shape, support.generator("adaptive", case), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(backend, "adaptive_avg_pool2d", x, dict(output_size=size), f"{backend} {name}")


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes(dtype, bd):
    backend, device = bd
    support.require(backend, device)
    x = support.randn((2, 4, 8, 8), support.generator("avg", dtype), dtype, device)
    x = x.contiguous(memory_format=torch.channels_last)
    check(backend, "avg_pool2d", x, params(2, 2, 0, False, True, None), f"{dtype} 2/2")
    check(backend, "adaptive_avg_pool2d", x, dict(output_size=1), f"{dtype} global")


def test_torch_backend_is_routed_and_matches_float64():
    x = support.randn((2, 3, 16, 17), support.generator("avg torch"))
    p = params(3, 2, 1, True, False, None)
    assert fastconv.functional.backend_for("avg_pool2d", x, **p, backend="torch") == "torch"
    out = fastconv.functional.avg_pool2d(x, **p, backend="torch")
    assert torch.equal(out, torch.nn.functional.avg_pool2d(x, **p))
    assert_within(out, *support.avg_pool_reference("avg_pool2d", x, p, None)["output"], "torch")


# Edge shapes (moved from test_reliability_numerics.py): batch 0, 1x1 spatial, outputs of size 1,
# very wide channels, outputs larger than the input. make_case's random arguments, checked by
# support.check_against_reference (every element within its bound).
EDGE_CASES = [
    ("avgpool batch0", "avg_pool2d", (0, 3, 7, 7), dict(kernel_size=3, stride=2)),
    ("avgpool 1x1 spatial", "avg_pool2d", (2, 3, 1, 1), dict(kernel_size=1)),
    ("avgpool output 1x1", "avg_pool2d", (2, 3, 3, 3), dict(kernel_size=3)),
    ("avgpool wide channels", "avg_pool2d", (1, 4096, 2, 2), dict(kernel_size=2)),
    ("avgpool odd ceil no pad count", "avg_pool2d", (2, 3, 7, 5),
     dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avgpool divisor", "avg_pool2d", (1, 2, 5, 6), dict(kernel_size=2, divisor_override=3)),
    ("adaptive batch0", "adaptive_avg_pool2d", (0, 3, 7, 7), dict(output_size=1)),
    ("adaptive 1x1 spatial", "adaptive_avg_pool2d", (2, 3, 1, 1), dict(output_size=1)),
    ("adaptive global odd", "adaptive_avg_pool2d", (2, 3, 7, 5), dict(output_size=1)),
    ("adaptive wide channels", "adaptive_avg_pool2d", (1, 4096, 3, 3), dict(output_size=1)),
    ("adaptive odd", "adaptive_avg_pool2d", (2, 3, 7, 5), dict(output_size=(3, 2))),
    ("adaptive larger than input", "adaptive_avg_pool2d", (1, 2, 3, 3), dict(output_size=(5, 4))),
]


@pytest.mark.parametrize("bd", support.backend_params(support.BACKENDS))
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_shapes(case, bd):
    name, op, shape, params = case
    backend, device = bd
    support.require(backend, device)
    args = support.make_case(op, shape, device=device, **dict(params))
    support.check_against_reference(op, args, backend, what=f"{backend} {name}")
