"""max_pool2d (+ fused ReLU) on every kernel backend and device against float64: the output
exactly (a max is one of its inputs), torch's indices, and grad_input elementwise within the
bound of the window sums (tests/support.py). Varied: padding, dilation, ceil_mode and the last
windows it adds, strides below/at/above the kernel, return_indices, relu, both memory formats,
output planes of 64 elements and more (tile boundaries), float16/float64 where served.
"""
import pytest
import torch

import fastconv
import support
from support import assert_layout, assert_within

pytestmark = pytest.mark.usefixtures("small_tiles")

# (id, (N, C, H, W), kernel, stride, padding, dilation, ceil_mode): MODELS.md pools scaled down
# and the geometry that matters. The first rows have output planes of >= 64 elements.
CASES = [
    ("alexnet 3/2 8x8 out", (2, 3, 17, 17), 3, 2, 0, 1, False),
    ("vgg 2/2 9x8 out", (2, 3, 18, 16), 2, 2, 0, 1, False),
    ("inception 3/1/1 8x9 out", (1, 3, 8, 9), 3, 1, 1, 1, False),
    ("dilated 2 ceil 8x8 out", (1, 3, 19, 19), 3, 2, 1, 2, True),
    ("dilated (2,3) ceil rect", (1, 3, 11, 10), (3, 2), (2, 1), (1, 1), (2, 3), True),
    ("vgg 2/2 odd ceil: last window half out", (2, 3, 7, 9), 2, 2, 0, 1, True),
    ("stem 3/2/1 odd ceil", (1, 3, 11, 13), 3, 2, 1, 1, True),
    ("ceil window starting in the padding is dropped", (1, 2, 6, 6), 3, 2, 1, 1, True),
    ("vgg 2x2 -> 1x1", (3, 5, 2, 2), 2, 2, 0, 1, False),
    ("asymmetric", (1, 2, 9, 8), (1, 3), (1, 2), (0, 1), 1, False),
    ("5/2/2: first cells outside", (1, 2, 11, 9), 5, 2, 2, 1, False),
    ("stride 3 > kernel 2: inputs in no window", (1, 3, 8, 10), 2, 3, 0, 1, True),
    ("k3 s(3,2) mixed", (1, 2, 10, 9), 3, (3, 2), 1, 1, True),
    ("long rows", (1, 2, 5, 70), 3, 2, 1, 1, False),
    ("stem 3/2/1", (2, 3, 12, 12), 3, 2, 1, 1, False),
    ("stride 3 (per-input gather)", (2, 3, 10, 11), 3, 3, 0, 1, False),
]
# relu and return_indices alternate over the cases (all four pairs appear), both layouts each


def check(backend, x, k, s, p, d, ceil, relu, return_indices, what):
    gen = support.generator("max_pool2d grad", what)
    a = dict(input=x, kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=ceil,
             return_indices=return_indices, relu=relu)
    probe = support.REF.max_pool2d(x, k, s, p, d, ceil, False, False)
    g = support.grad_for(probe.shape, gen, x.dtype, x.device)
    try:
        out, idx, grads, _ = support.run("max_pool2d", a, backend, g)
    except fastconv.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    ref = support.max_pool_reference(x, k, s, p, d, ceil, relu, g)
    assert out.dtype == x.dtype
    assert_layout(out, x, f"{what} output")
    assert_within(out, *ref["output"], f"{what} output")
    if return_indices:
        assert idx.dtype == torch.int64 and torch.equal(idx.cpu(), ref["indices"].cpu()), \
            f"{what}: indices differ from torch's"
    assert_layout(grads["input"], x, f"{what} grad_input")
    assert_within(grads["input"], *ref["input"], f"{what} grad_input")
    return out


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_max_pool2d(case, channels_last, bd):
    name, shape, k, s, p, d, ceil = case
    backend, device = bd
    support.require(backend, device)
    i = [c[0] for c in CASES].index(name)
    relu, return_indices = bool(i % 2), bool((i // 2 + channels_last) % 2)
    x = support.randn(shape, support.generator("max_pool2d", case), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(backend, x, k, s, p, d, ceil, relu, return_indices, f"{backend} {name}")


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes(dtype, bd):
    backend, device = bd
    support.require(backend, device)
    x = support.randn((2, 3, 9, 9), support.generator("max_pool2d", dtype), dtype, device)
    check(backend, x, 3, 2, 0, 1, False, True, False, f"{dtype} 3/2 relu")
    check(backend, x, 2, 2, 0, 1, True, False, True, f"{dtype} 2/2 ceil indices")


@pytest.mark.parametrize("bd", support.backend_params())
def test_strided_input(bd):
    backend, device = bd
    support.require(backend, device)
    x = support.randn((2, 6, 9, 10), support.generator("max_pool2d strided"), device=device)
    x = x[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check(backend, x, 3, 2, 1, 1, False, True, True, "strided")


@pytest.mark.parametrize("bd", support.backend_params())
def test_relu_blocks_gradient_of_nonpositive_windows(bd):
    # relu=True: a window whose maximum is <= 0 outputs 0 and passes no gradient
    backend, device = bd
    support.require(backend, device)
    x = -support.randn((1, 2, 6, 6), support.generator("max_pool2d relu"), device=device).abs()
    x[0, 0, 0, 0] = 2.0
    xt = x.clone().requires_grad_(True)
    out = fastconv.functional.max_pool2d(xt, 2, relu=True, backend=backend)
    assert float(out[0, 0, 0, 0]) == 2.0 and bool((out.flatten()[1:] == 0).all())
    (gx,) = torch.autograd.grad(out.sum(), xt)
    assert float(gx[0, 0, 0, 0]) == 1.0 and float(gx.abs().sum()) == 1.0


def test_torch_backend_is_routed_and_matches_float64():
    x = support.randn((2, 3, 17, 17), support.generator("max_pool2d torch"))
    a = dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
    assert fastconv.functional.backend_for("max_pool2d", x, **a, backend="torch") == "torch"
    out = fastconv.functional.max_pool2d(x, **a, relu=True, backend="torch")
    assert torch.equal(out, torch.relu(torch.nn.functional.max_pool2d(x, **a)))
    ref = support.max_pool_reference(x, 3, 2, 1, 2, True, True, None)
    assert_within(out, *ref["output"], "torch output")



# Edge shapes (moved from test_reliability_numerics.py): batch 0, 1x1 spatial, an output of size
# 1, a global padded window, very wide channels. make_case's random arguments, checked by
# support.check_against_reference (every element within its bound).
EDGE_CASES = [
    ("maxpool batch0", "max_pool2d", (0, 3, 7, 7), dict(kernel_size=3, stride=2)),
    ("maxpool 1x1 spatial", "max_pool2d", (2, 3, 1, 1), dict(kernel_size=1)),
    ("maxpool output 1x1", "max_pool2d", (2, 3, 3, 3), dict(kernel_size=3, relu=True)),
    ("maxpool global padded", "max_pool2d", (2, 3, 4, 4),
     dict(kernel_size=4, padding=2, ceil_mode=True, return_indices=True)),
    ("maxpool wide channels", "max_pool2d", (1, 4096, 2, 2), dict(kernel_size=2)),
    ("maxpool odd ceil indices", "max_pool2d", (2, 3, 7, 5),
     dict(kernel_size=3, stride=2, ceil_mode=True, return_indices=True, relu=True)),
    ("maxpool dilated", "max_pool2d", (1, 2, 9, 8),
     dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(2, 3))),
]


@pytest.mark.parametrize("bd", support.backend_params(support.BACKENDS))
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_shapes(case, bd):
    name, op, shape, params = case
    backend, device = bd
    support.require(backend, device)
    args = support.make_case(op, shape, device=device, **dict(params))
    support.check_against_reference(op, args, backend, what=f"{backend} {name}")
