"""The Triton conv2d_relu (fastconv/backends/triton/conv.py): forward and every gradient against a
float64 torch reference, on the conv layers of the target models scaled down (same kernel,
stride, padding, dilation; channels divided, batch 2, small images), plus layouts, groups,
odd sizes and the custom-op plumbing.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
float32 and float16 only: the interpreter's bf16 dot is wrong. On a GPU the same cases also run
in bfloat16, and torch.compile / opcheck tests run.

Tolerances are elementwise error bounds, not fudge factors. A dot product of L terms accumulated
in float32 errs by at most gamma_L * sum|a_i b_i| with gamma_L = L u / (1 - L u), u = 2^-24
(rounding-error analysis of recursive summation; splitting the sum only shortens the chains). TF32
dots first round each operand to 10 mantissa bits: + 2 * 2^-11 * sum|a_i b_i|. Storing the result
in a 16-bit dtype adds half an ulp: 2^-11 (fp16) or 2^-8 (bf16) times |result|. The magnitude
sum|a_i b_i| is computed exactly by running the same float64 conv on |inputs|.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastconv.backends.triton import conv2d_relu as conv  # noqa: E402
from fastconv.backends.triton import utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# The tensor cores read tf32 operands by truncating fp32 to 10 mantissa bits (no rounding:
# Triton feeds the fp32 registers to the MMA as they are), so each operand carries a relative
# error below 2**-10 and a product below 2 * 2**-10 (seen on an H100: up to 1.7x the
# round-to-nearest bound 2 * 2**-11).
TF32_PRODUCT = 2 * 2.0**-10
U_ACC = 2.0**-24


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    # every output, gradient and split-K partial buffer starts as NaN: unwritten elements show
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)


def gamma(n: int) -> float:
    return n * U_ACC / (1 - n * U_ACC)


# (name, N, C, H, W, K, kernel, stride, padding, dilation, groups)
# Scaled from docs/MODELS.md: channel counts divided (by 8 mostly), spatial sizes shrunk.
MODEL_CASES = [
    ("alexnet1 11x11 s4 C=1", 2, 1, 27, 27, 12, 11, 4, 1, 1, 1),
    ("alexnet2 5x5 p2", 2, 12, 7, 7, 32, 5, 1, 2, 1, 1),
    ("alexnet3 3x3", 2, 32, 5, 5, 48, 3, 1, 1, 1, 1),
    ("alexnet4 3x3", 2, 48, 5, 5, 48, 3, 1, 1, 1, 1),
    ("alexnet5 3x3", 2, 48, 5, 5, 32, 3, 1, 1, 1, 1),
    ("alexnet imagenet 11x11 s4 C=3", 2, 3, 23, 23, 12, 11, 4, 2, 1, 1),
    ("alexnet 2-group 5x5", 2, 32, 6, 6, 32, 5, 1, 2, 1, 2),
    ("alexnet 2-group 3x3", 2, 48, 5, 5, 48, 3, 1, 1, 1, 2),
    ("vgg11 conv1 C=1", 2, 1, 8, 8, 8, 3, 1, 1, 1, 1),
    ("vgg11 conv2", 2, 8, 8, 8, 16, 3, 1, 1, 1, 1),
    ("vgg11 conv3", 2, 16, 6, 6, 32, 3, 1, 1, 1, 1),
    ("vgg11 conv5", 2, 32, 4, 4, 64, 3, 1, 1, 1, 1),
    ("vgg11 conv7 512", 2, 64, 3, 3, 64, 3, 1, 1, 1, 1),
    ("vgg16 cifar C=3", 2, 3, 8, 8, 8, 3, 1, 1, 1, 1),
    ("nin1 11x11 s4 p0", 2, 1, 27, 27, 12, 11, 4, 0, 1, 1),
    ("nin 1x1", 2, 12, 5, 5, 12, 1, 1, 0, 1, 1),
    ("nin 1x1 wide", 2, 32, 4, 4, 32, 1, 1, 0, 1, 1),
    ("nin last 3x3 K=10", 2, 48, 4, 4, 10, 3, 1, 1, 1, 1),
    ("googlenet b1 7x7 s2 p3", 2, 1, 16, 16, 8, 7, 2, 3, 1, 1),
    ("googlenet b2 1x1", 2, 8, 6, 6, 8, 1, 1, 0, 1, 1),
    ("googlenet b2 3x3", 2, 8, 6, 6, 24, 3, 1, 1, 1, 1),
    ("inception 1x1", 2, 24, 5, 5, 8, 1, 1, 0, 1, 1),
    ("inception 3x3", 2, 12, 5, 5, 16, 3, 1, 1, 1, 1),
    ("inception 5x5 p2", 2, 2, 5, 5, 4, 5, 1, 2, 1, 1),
    ("inception 5x5 wide", 2, 16, 5, 5, 16, 5, 1, 2, 1, 1),
    ("lenet 5x5 p2", 2, 1, 12, 12, 6, 5, 1, 2, 1, 1),
    ("lenet 5x5", 2, 6, 8, 8, 16, 5, 1, 0, 1, 1),
    ("lenet relu 3x3 C=20 K=50", 2, 20, 6, 6, 50, 3, 1, 0, 1, 1),
    ("resnet stem 7x7 s2", 2, 1, 16, 16, 16, 7, 2, 3, 1, 1),
    ("resnet 3x3 s1", 2, 16, 6, 6, 16, 3, 1, 1, 1, 1),
    ("resnet 3x3 s2", 2, 16, 7, 7, 32, 3, 2, 1, 1, 1),
    ("resnet 1x1 s2 downsample", 2, 16, 7, 7, 32, 1, 2, 0, 1, 1),
]

EXTRA_CASES = [
    ("dilation 2", 2, 16, 9, 9, 16, 3, 1, 2, 2, 1),
    ("odd sizes", 3, 5, 11, 7, 7, 3, 2, 1, 1, 1),
    ("rect kernel/stride/pad", 2, 16, 9, 8, 24, (3, 1), (2, 1), (1, 0), (1, 2), 1),
    ("stride 3 dilation 2", 2, 16, 11, 11, 16, 3, 3, 1, 2, 1),
    ("4 groups", 2, 32, 5, 5, 32, 3, 1, 1, 1, 4),
    ("depthwise", 2, 16, 5, 5, 16, 3, 1, 1, 1, 16),
    # padding beyond the kernel's reach: grad_input's mirrored conv gets negative padding
    ("1x1 pad 1", 2, 16, 5, 5, 16, 1, 1, 1, 1, 1),
    ("3x3 pad 3", 2, 16, 4, 5, 16, 3, 1, 3, 1, 1),
    # more than 31 taps: the forward's per-row tap bitmask does not fit, bounds are tested
    ("7x7 taps padded", 2, 16, 6, 6, 16, 7, 1, 3, 1, 1),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_inputs(case, dtype, device, layout="nchw", bias=True, seed=0):
    _, N, C, H, W, K, k, s, p, d, g = case
    R, S = _pair(k)
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        # non-contiguous: a window of a larger tensor, every other column (sliced after the
        # dtype/device move, which would otherwise densify it)
        big = torch.randn(N, C + 3, H + 2, 2 * W + 1, generator=gen).to(device, dtype)
        x = big[:, 1:C + 1, 1:H + 1, ::2]
    else:
        x = torch.randn(N, C, H, W, generator=gen).to(device, dtype)
    w = (torch.randn(K, C // g, R, S, generator=gen) / math.sqrt(C // g * R * S)).to(device, dtype)
    b = torch.randn(K, generator=gen).to(device, dtype) if bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b, dict(stride=_pair(s), padding=_pair(p), dilation=_pair(d), groups=g)


def _tf32_on(dtype, device) -> bool:
    return dtype == torch.float32 and device.type == "cuda" and conv._allow_tf32()


def check_case(case, dtype, layout="nchw", bias=True, relu=True, via="backend",
               need_input_grad=True):
    x, w, b, geo = make_inputs(case, dtype, DEVICE, layout, bias)
    x.requires_grad_(need_input_grad)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    if via == "functional":
        import fastconv.functional as FF

        y = FF.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"], geo["groups"],
                           relu=relu, backend="triton")
    elif via == "op":  # the registered custom op and its register_autograd formula
        y = torch.ops.fastconv.triton_conv2d_relu(x, w, b, list(geo["stride"]), list(geo["padding"]),
                                                  list(geo["dilation"]), geo["groups"], relu)
    else:
        y = conv.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"],
                             geo["groups"], relu)

    # forward against float64, and the memory format torch's own conv gives
    x64, w64 = x.detach().double(), w.detach().double()
    b64 = b.detach().double() if b is not None else None
    pre = F.conv2d(x64, w64, b64, **geo)
    ref = pre.relu() if relu else pre
    mag = F.conv2d(x64.abs(), w64.abs(), b64.abs() if b64 is not None else None, **geo)
    L = w.shape[1] * w.shape[2] * w.shape[3] + 1
    tf32 = TF32_PRODUCT if _tf32_on(dtype, DEVICE) else 0.0
    bound = (gamma(L) + tf32) * mag + U_OUT[dtype] * ref.abs()
    assert y.shape == ref.shape and y.dtype == dtype
    torch_layout = F.conv2d(x.detach(), w.detach(), b.detach() if b is not None else None, **geo)
    assert y.stride() == torch_layout.stride(), "output memory format differs from torch's"
    err = (y.double() - ref).abs()
    assert not torch.isnan(y).any()
    assert (err <= bound).all(), f"forward: max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"

    # backward: the reference uses the kernel's own ReLU mask (where |pre| is within the bound,
    # rounding may legitimately flip it); elsewhere the masks must agree
    if relu:
        mask = y.detach() > 0
        assert ((mask == (pre > 0)) | (pre.abs() <= bound)).all(), "ReLU mask disagrees"
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    wants = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wants, gy)
    got = dict(zip([id(t) for t in wants], grads))
    g64 = gy.double() * mask if relu else gy.double()
    n_pix = y.shape[0] * y.shape[2] * y.shape[3]
    if need_input_grad:
        ref_dx = torch.nn.grad.conv2d_input(x.shape, w64, g64, **geo)
        mag_dx = torch.nn.grad.conv2d_input(x.shape, w64.abs(), g64.abs(), **geo)
        L = w.shape[0] // geo["groups"] * w.shape[2] * w.shape[3]
        _assert_grad(got[id(x)], ref_dx, mag_dx, L, dtype, "grad_input")
        torch_dx = torch.autograd.grad(F.conv2d(x, w.detach(), None, **geo), x, gy)[0]
        assert got[id(x)].stride() == torch_dx.stride(), "grad_input memory format differs from torch's"
    else:
        assert x.grad is None
    ref_dw = torch.nn.grad.conv2d_weight(x64, w.shape, g64, **geo)
    mag_dw = torch.nn.grad.conv2d_weight(x64.abs(), w.shape, g64.abs(), **geo)
    _assert_grad(got[id(w)], ref_dw, mag_dw, n_pix + 64, dtype, "grad_weight")
    assert got[id(w)].stride() == w.stride(), "grad_weight layout differs from weight's"
    if b is not None:
        _assert_grad(got[id(b)], g64.sum((0, 2, 3)), g64.abs().sum((0, 2, 3)), n_pix + 64, dtype,
                     "grad_bias")
    return y


def _assert_grad(got, ref, mag, L, dtype, what):
    assert got.shape == ref.shape and got.dtype == dtype, what
    assert not torch.isnan(got).any(), f"{what} has NaN"
    tf32 = TF32_PRODUCT if _tf32_on(dtype, DEVICE) else 0.0
    bound = (gamma(L) + tf32) * mag + U_OUT[dtype] * ref.abs()
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"{what}: max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"
    # the check has teeth: the gradient is not ~0 everywhere
    assert ref.abs().max() > 10 * bound.max() or ref.abs().max() > 1e-3


CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def _id(case):
    return case[0].replace(" ", "_")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODEL_CASES, ids=_id)
def test_model_layers(case, dtype):
    # the first layer never needs grad_input in training; test both anyway, alternating
    check_case(case, dtype, layout="channels_last" if dtype == torch.float16 else "nchw")


@pytest.mark.parametrize("case", EXTRA_CASES, ids=_id)
def test_extra_geometry(case):
    check_case(case, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_layouts(layout):
    check_case(("3x3 C=20", 2, 20, 7, 6, 24, 3, 1, 1, 1, 1), torch.float16, layout=layout)
    check_case(("5x5 C=3", 2, 3, 9, 8, 16, 5, 2, 2, 1, 1), torch.float32, layout=layout)


@pytest.mark.parametrize("bias,relu", [(False, True), (True, False), (False, False)])
def test_bias_and_relu_switches(bias, relu):
    check_case(("3x3", 2, 16, 6, 6, 16, 3, 1, 1, 1, 1), torch.float32, bias=bias, relu=relu)
    check_case(("flat 5x5", 2, 3, 8, 8, 16, 5, 1, 2, 1, 1), torch.float16, bias=bias, relu=relu)


def test_through_public_functional():
    check_case(MODEL_CASES[2], torch.float32, via="functional")
    check_case(EXTRA_CASES[1], torch.float16, layout="channels_last", via="functional")


@pytest.mark.parametrize("relu", [True, False])
def test_through_registered_op(relu):
    check_case(MODEL_CASES[1], torch.float32, via="op", relu=relu)
    check_case(("3x3 s2 g2", 2, 32, 7, 7, 32, 3, 2, 1, 1, 2), torch.float16, layout="channels_last",
               via="op", relu=relu)


@pytest.mark.parametrize("via", ["backend", "op"])
def test_first_layer_skips_grad_input(monkeypatch, via):
    def boom(*args, **kwargs):
        raise AssertionError("grad_input computed for an input that does not require grad")

    monkeypatch.setattr(conv, "grad_input_op", boom)
    monkeypatch.setattr(conv, "_grad_input", boom)
    check_case(MODEL_CASES[0], torch.float32, need_input_grad=False, via=via)


def test_frozen_weight_trained_bias():
    x, w, b, geo = make_inputs(("3x3", 2, 16, 6, 6, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE)
    b.requires_grad_()
    y = conv.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"], 1, True)
    gy = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, b, gy)
    ref = (gy.double() * (y > 0)).sum((0, 2, 3))
    assert torch.allclose(gb.double(), ref, rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused():
    x, w, b, geo = make_inputs(("3x3", 1, 16, 5, 5, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE)
    w.requires_grad_()
    y = conv.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"], 1, True)
    (gw,) = torch.autograd.grad(y.sum(), w, create_graph=True)
    with pytest.raises(RuntimeError):
        gw.sum().backward()


CONFIG_CASES = [
    # forward/dgrad tiles of 16, several channel blocks, split-K over the reduction
    dict(fwd=conv._cfg(16, 16, 16, 4, 2), dgrad=conv._cfg(16, 16, 16, 4, 2),
         wgrad=conv._cfg(16, 16, 16, 4, 2, split=5)),
    # flat reduction forced on a wide layer, taps forced on a thin one
    dict(fwd=conv._cfg(32, 32, 16, 4, 2, flat=True), wgrad=conv._cfg(32, 32, 32, 4, 2, flat=True, split=2)),
]


@pytest.mark.parametrize("cfg", range(len(CONFIG_CASES)))
def test_forced_configs(cfg):
    with conv.forced_config(**CONFIG_CASES[cfg]):
        check_case(("3x3 C=40 K=40", 2, 40, 5, 5, 40, 3, 1, 1, 1, 1), torch.float32)
        check_case(("3x3 s2 grouped", 2, 32, 7, 7, 48, 3, 2, 1, 1, 2), torch.float16, layout="channels_last")


def test_forced_taps_on_thin_layer():
    with conv.forced_config(fwd=conv._cfg(32, 16, 16, 4, 2, flat=False),
                            wgrad=conv._cfg(16, 16, 32, 4, 2, flat=False, split=3)):
        check_case(("5x5 C=3", 2, 3, 8, 8, 8, 5, 1, 2, 1, 1), torch.float32)


def test_backward_paths_are_exercised(monkeypatch):
    # the fast paths and their general fallbacks both run above; check which launches happen:
    # grad_input of stride-1 convs is the forward kernel (mirrored taps), grad_weight walks G
    # and X as pixel rows when their layout allows and through (n, p, q) otherwise
    seen = []
    real_run = conv.run

    def spy(kernel, grid, args, meta, real):
        seen.append(dict(meta))
        return real_run(kernel, grid, args, meta, real)

    monkeypatch.setattr(conv, "run", spy)
    check_case(("3x3 same", 2, 16, 6, 6, 16, 3, 1, 1, 1, 1), torch.float16, layout="channels_last")
    assert any(m.get("FLIP") for m in seen), "stride-1 grad_input did not run the forward kernel"
    assert {(m["G_ROWS"], m["X_ROWS"]) for m in seen if "G_ROWS" in m} == {(True, True)}
    assert any(m.get("RELU") and m.get("WRITE") and m.get("BIAS") for m in seen)
    seen.clear()
    check_case(("3x3 valid", 2, 16, 6, 6, 16, 3, 1, 0, 1, 1), torch.float32, relu=False)
    assert {(m["G_ROWS"], m["X_ROWS"]) for m in seen if "G_ROWS" in m} == {(False, False)}
    assert not any(m.get("WRITE") for m in seen), "no ReLU: grad_output is used as it is"


def test_index64_path(monkeypatch):
    monkeypatch.setattr(utils, "FORCE_INDEX64", True)  # 64-bit offsets on small tensors
    check_case(("3x3 s2", 2, 16, 7, 7, 16, 3, 2, 1, 1, 1), torch.float32, layout="channels_last")
    check_case(("flat 7x7", 2, 1, 12, 12, 16, 7, 2, 3, 1, 1), torch.float16)


def test_split_k_is_deterministic():
    x, w, b, geo = make_inputs(("3x3", 2, 16, 8, 8, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE)
    y = conv.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"], 1, True)
    gy = torch.randn_like(y)
    outs = []
    with conv.forced_config(wgrad=conv._cfg(16, 16, 16, 4, 2, split=7)):
        for _ in range(2):
            g, gb = conv.grad_output_op(gy, y, True, True)
            gw = conv.grad_weight_op(g, x, list(w.shape), False, [1, 1], [1, 1], [1, 1], 1)
            outs.append((g, gw, gb))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    # and the masked G is exactly grad_output where the output is positive, 0 elsewhere
    assert torch.equal(outs[0][0], torch.where(y > 0, gy, 0))
    assert outs[0][0].is_contiguous(memory_format=torch.channels_last)


def test_nan_propagates_like_torch():
    x, w, b, geo = make_inputs(("3x3", 1, 16, 6, 6, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE)
    x[0, 3, 2, 2] = float("nan")
    y = conv.conv2d_relu(x, w, b, geo["stride"], geo["padding"], geo["dilation"], 1, True)
    ref = F.relu(F.conv2d(x, w, b, **geo))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(ref).any()


def test_empty_batch():
    x, w, b, geo = make_inputs(("3x3", 2, 16, 6, 6, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE)
    y = conv.conv2d_relu(x[:0], w, b, geo["stride"], geo["padding"], geo["dilation"], 1, True)
    assert y.shape == (0, 16, 6, 6)


def test_no_input_channels_go_to_torch():
    # torch gives an empty (N, 0, P, Q) result for input (N, 0, H, W); the kernels, which reduce
    # over channels, refuse it (auto then runs torch) instead of launching an empty reduction
    import fastconv.functional as FF

    x, w, b = torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3), torch.randn(3)
    args = dict(input=x, weight=w, bias=b, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups=1, relu=True)
    assert "input channels" in conv.why_not_conv2d_relu(args)
    with pytest.raises(ValueError, match=r"input channels.*\(2, 0, 5, 5\)"):
        torch.ops.fastconv.triton_conv2d_relu(x, w, b, [1, 1], [0, 0], [1, 1], 1, True)
    y = FF.conv2d_relu(x, w, b)
    assert y.shape == F.conv2d(x, w, b).shape


def test_why_not():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    args = dict(input=x, weight=torch.randn(4, 4, 3, 3, dtype=torch.float64), bias=None,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True)
    reason = conv.why_not_conv2d_relu(args)
    assert reason and "float64" in reason
    args.update(input=x.float(), weight=args["weight"].float())
    assert conv.why_not_conv2d_relu(args) is None
    args.update(input=torch.empty(1, 4, 1, 1).expand(2**17, 4, 2**7, 2**7))
    reason = conv.why_not_conv2d_relu(args)
    assert reason and "2**31" in reason


@pytest.mark.parametrize("x_layout,w_layout", [("nchw", "cl"), ("cl", "nchw"), ("c1", "cl"),
                                                ("c1", "nchw"), ("sliced_cl", "nchw"), ("sliced", "cl")])
def test_memory_format_follows_torch(x_layout, w_layout):
    # torch's conv gives channels_last output (and grad_input) when input OR weight is channels_last
    cl = torch.channels_last
    C = 1 if x_layout == "c1" else 4
    x = {"nchw": lambda: torch.randn(2, C, 6, 6), "c1": lambda: torch.randn(2, C, 6, 6),
         "cl": lambda: torch.randn(2, C, 6, 6).contiguous(memory_format=cl),
         "sliced_cl": lambda: torch.randn(2, 2 * C, 6, 6).contiguous(memory_format=cl)[:, ::2],
         "sliced": lambda: torch.randn(2, C, 6, 12)[..., ::2]}[x_layout]().to(DEVICE)
    w = torch.randn(16, C, 3, 3, device=DEVICE)
    if w_layout == "cl":
        w = w.contiguous(memory_format=cl)
    x.requires_grad_()
    y = conv.conv2d_relu(x, w, None, (1, 1), (1, 1), (1, 1), 1, False)
    ref = F.conv2d(x, w, None, 1, 1)
    assert y.stride() == ref.stride()
    gy = torch.randn_like(ref)
    assert torch.autograd.grad(y, x, gy)[0].stride() == torch.autograd.grad(ref, x, gy)[0].stride()


def test_custom_ops_registered_with_fake_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.fastconv, "triton_conv2d_relu")
    with FakeTensorMode():
        x = torch.empty(2, 8, 9, 9, device=DEVICE).contiguous(memory_format=torch.channels_last)
        w = torch.empty(16, 8, 3, 3, device=DEVICE)
        y = torch.ops.fastconv.triton_conv2d_relu(x, w, None, [2, 2], [1, 1], [1, 1], 1, True)
        assert y.shape == (2, 16, 5, 5)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g, gb = torch.ops.fastconv.triton_conv2d_relu_grad_output(y, y, True, True)
        assert g.shape == y.shape and g.is_contiguous(memory_format=torch.channels_last)
        assert gb.shape == (16,)
        g_none, gb_none = torch.ops.fastconv.triton_conv2d_relu_grad_output(y, None, False, False)
        assert g_none.numel() == 0 and gb_none.numel() == 0
        gi = torch.ops.fastconv.triton_conv2d_relu_grad_input(g, w, [2, 8, 9, 9], True, [2, 2],
                                                               [1, 1], [1, 1], 1)
        assert gi.shape == x.shape and gi.stride() == x.stride()
        gw = torch.ops.fastconv.triton_conv2d_relu_grad_weight(g, x, [16, 8, 3, 3], False,
                                                               [2, 2], [1, 1], [1, 1], 1)
        assert gw.shape == w.shape and gw.stride() == w.stride()


def test_opcheck_schema_and_fake():
    x, w, b, geo = make_inputs(("3x3", 2, 16, 5, 5, 16, 3, 1, 1, 1, 1), torch.float32, DEVICE,
                               layout="channels_last")
    x.requires_grad_()
    w.requires_grad_()
    args = (x, w, b, [1, 1], [1, 1], [1, 1], 1, True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastconv.triton_conv2d_relu.default, args, test_utils=tests)


def test_autotune_table_roundtrip(tmp_path, monkeypatch):
    from fastconv.backends.triton import autotune

    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    table = autotune.ConfigTable("conv_test")
    assert table.get("H100|sm90", "k") is None
    table.put("NVIDIA H100 80GB HBM3|sm90", "k", conv._cfg(64, 64, 32, 4, 3), 0.5)
    again = autotune.ConfigTable("conv_test")  # a fresh process reads it back from disk
    assert again.get("NVIDIA H100 80GB HBM3|sm90", "k") == conv._cfg(64, 64, 32, 4, 3)
    assert again.get("NVIDIA H100 PCIe|sm90", "k") == conv._cfg(64, 64, 32, 4, 3)  # same arch
    assert again.get("NVIDIA A100|sm80", "k") is None
    (tmp_path / "autotune" / "conv_test.json").write_text("{not json")
    assert autotune.ConfigTable("conv_test").get("x|sm90", "k") is None  # corrupt cache = empty


def test_select_uses_table(monkeypatch):
    pb = dict(kind="fwd", device="cpu", bits=32, dtype="fp32", layout="nchw", chan=16, kout=16,
              R=3, S=3, stride="1x1", dil="1x1", padded=True, groups=1, gemm_m=100, gemm_n=16,
              red=144, flat=False, dot=2)
    heur = conv._select("fwd", pb, None, torch.device("cpu"), True)
    assert heur == conv._heuristic("fwd", pb)
    pinned = conv._cfg(16, 16, 16, 1, 1)
    monkeypatch.setattr(conv._TABLE, "_mem", {("interpreter", conv._key("fwd", pb)): pinned})
    assert conv._select("fwd", pb, None, torch.device("cpu"), True) == pinned


# ------------------------------------------------------------------------------ GPU only
@requires_cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_honours_tf32_switch(tf32, monkeypatch):
    flags = getattr(torch.backends.cudnn, "conv", None)
    if flags is not None and hasattr(flags, "fp32_precision"):  # torch's newer TF32 API
        monkeypatch.setattr(flags, "fp32_precision", "tf32" if tf32 else "ieee")
    else:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    assert conv._dot_mode(torch.float32) == (1 if tf32 else 2)
    check_case(("3x3 C=64", 4, 64, 12, 12, 64, 3, 1, 1, 1, 1), torch.float32, layout="channels_last")


@requires_cuda
def test_gpu_bigger_shapes_bf16():
    # tiles of the real (non-interpreter) configurations, several waves and split-K
    check_case(("vgg-ish", 8, 64, 28, 28, 128, 3, 1, 1, 1, 1), torch.bfloat16, layout="channels_last")
    check_case(("alexnet1", 8, 1, 224, 224, 96, 11, 4, 1, 1, 1), torch.bfloat16, layout="channels_last")
    check_case(("1x1", 8, 192, 28, 28, 64, 1, 1, 0, 1, 1), torch.bfloat16, layout="channels_last")


@requires_cuda
def test_opcheck_full():
    x, w, b, geo = make_inputs(("3x3", 2, 16, 9, 9, 32, 3, 2, 1, 1, 1), torch.float32, DEVICE,
                               layout="channels_last")
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.fastconv.triton_conv2d_relu.default,
                          (x, w, b, [2, 2], [1, 1], [1, 1], 1, True))


@requires_cuda
def test_compile_fullgraph_op():
    x, w, b, geo = make_inputs(("3x3", 4, 32, 16, 16, 64, 3, 1, 1, 1, 1), torch.bfloat16, DEVICE,
                               layout="channels_last")
    w.requires_grad_()

    def f(x, w, b):
        y = torch.ops.fastconv.triton_conv2d_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, True)
        return y.float().square().mean()

    eager = f(x, w, b)
    (g_eager,) = torch.autograd.grad(eager, w)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, w, b)
    (g_comp,) = torch.autograd.grad(out, w)
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(g_comp, g_eager, rtol=2e-2, atol=1e-3)


@requires_cuda
def test_compile_fullgraph_converted_alexnet():
    models = pytest.importorskip("fastconv.models")
    convert = pytest.importorskip("fastconv.convert")
    net = models.alexnet().to(DEVICE, memory_format=torch.channels_last)
    fast = convert.convert(net, backend="triton")
    x = torch.randn(8, 1, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = fast(x)
        compiled = torch.compile(fast, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=3e-2, atol=3e-2)
    compiled.float().sum().backward()
