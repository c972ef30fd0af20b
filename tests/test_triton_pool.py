"""Triton max-pool / avg-pool / adaptive avg-pool against torch, forward and backward.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are the MODELS.md pool layers scaled down. The tile sizes are shrunk to a few
elements so that every shape spans several programs with ragged edges, as on the GPU.
Outputs are allocated poisoned (NaN, or an impossible index) so unwritten elements fail.
"""
import pytest
import torch
import torch.nn.functional as F

from support import assert_within, avg_pool_reference, max_pool_reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

max_pool = pytest.importorskip("fastconv.backends.triton.max_pool2d")
avg_pool = pytest.importorskip("fastconv.backends.triton.avg_pool2d")
utils = pytest.importorskip("fastconv.backends.triton.utils")
from fastconv.shapes import dense_channels_last  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
SMALL_TILES = {"tile": 256, "bwd_tile": 128, "max_cols": 4, "nchw_max_cols": 8, "num_warps": 4}


@pytest.fixture(autouse=True)
def _poison_and_small_tiles(monkeypatch):
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)
    if not HAS_CUDA:
        monkeypatch.setitem(max_pool.TUNING, "cpu", dict(SMALL_TILES))
        monkeypatch.setitem(avg_pool.TUNING, "cpu", dict(SMALL_TILES))


def _input(shape, dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _exact(actual, expected, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=0, atol=0,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


# (the max-pool numerics on every backend, model shapes included: tests/test_max_pool2d.py)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_max_pool(x, k, s, p, d, ceil, relu, return_indices, what):
    k, s, p, d = map(_pair, (k, s, p, d))
    xt = x.detach().clone().requires_grad_(True)
    res = max_pool.max_pool2d(xt, k, s, p, d, ceil, return_indices, relu)
    out, idx = res if return_indices else (res, None)
    xd = x.detach().double().requires_grad_(True)
    ref, ref_idx = F.max_pool2d(xd, k, s, p, d, ceil, return_indices=True)
    if relu:
        ref = torch.relu(ref)
    assert out.dtype == x.dtype and out.shape == ref.shape
    cl = dense_channels_last(x)
    assert out.is_contiguous(memory_format=_fmt(cl)), f"{what}: output lost the memory format"
    _exact(out, ref, f"{what} output")  # a max is one of its inputs: no rounding at all
    if return_indices:
        assert idx.dtype == torch.int64
        _exact(idx, ref_idx, f"{what} indices")
    g = torch.randn(ref.shape, dtype=torch.float64).to(x.dtype).to(DEV)
    (gx,) = torch.autograd.grad(out, xt, g)
    assert gx.is_contiguous(memory_format=_fmt(cl)), f"{what}: grad lost the memory format"
    # each input gathers the gradients of the windows it wins, summed in float32
    bounds = max_pool_reference(x, k, s, p, d, ceil, relu, g)
    assert_within(gx, *bounds["input"], f"{what} grad_input")
    return out


@pytest.mark.parametrize("relu,return_indices", [(True, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_max_pool2d_other_modes(relu, return_indices, channels_last):
    x = _input((2, 3, 9, 11), channels_last=channels_last, seed=1)
    _check_max_pool(x, 3, 2, 1, 1, True, relu, return_indices, "3/2/1 ceil")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool2d_nan_and_inf(channels_last, relu):
    # several NaNs per window (torch reports the last), -inf windows (torch reports the first
    # in-bounds tap), and a plane of -inf
    x = _input((2, 3, 9, 8), seed=2)
    g = torch.Generator().manual_seed(3)
    where = torch.rand(x.shape, generator=g).to(DEV)
    x[where < 0.12] = float("nan")
    x[where > 0.85] = float("-inf")
    x[1, 2] = float("-inf")
    x[0, 1, 3:6, 3:6] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for k, s, p in ((3, 2, 1), (2, 2, 0)):
        out = _check_max_pool_nan(x, k, s, p, relu)
        assert torch.isnan(out).any() and (torch.isinf(out).any() or relu)


def _check_max_pool_nan(x, k, s, p, relu):
    what = f"NaN/-inf {k}/{s}/{p} relu={relu}"
    k, s, p, d = _pair(k), _pair(s), _pair(p), (1, 1)
    xt = x.detach().clone().requires_grad_(True)
    out, idx = max_pool.max_pool2d(xt, k, s, p, d, False, True, relu)
    xr = x.detach().clone().requires_grad_(True)  # torch itself, same dtype, for the indices
    ref, ref_idx = F.max_pool2d(xr, k, s, p, d, return_indices=True)
    if relu:
        ref = torch.relu(ref)
    _exact(out, ref, f"{what} output")
    _exact(idx, ref_idx, f"{what} indices")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    (gx,) = torch.autograd.grad(out, xt, g)
    (gr,) = torch.autograd.grad(ref, xr, g)
    torch.testing.assert_close(gx, gr, rtol=1e-6, atol=1e-6, equal_nan=True)
    # and the window-local int8 path (what a training step uses) routes the same gradient
    xl = x.detach().clone().requires_grad_(True)
    outl = max_pool.max_pool2d(xl, k, s, p, d, False, False, relu)
    _exact(outl, ref, f"{what} output (local indices)")
    (gl,) = torch.autograd.grad(outl, xl, g)
    torch.testing.assert_close(gl, gr, rtol=1e-6, atol=1e-6, equal_nan=True)
    return out


def test_max_pool2d_saved_index_dtype(monkeypatch):
    x = _input((1, 2, 13, 12), channels_last=True)
    out, idx = torch.ops.fastconv.triton_max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], False,
                                                    False, False)
    assert idx.dtype == torch.int8 and idx.stride() == out.stride()
    assert int(idx.min()) >= 0 and int(idx.max()) <= 8
    # 130 taps do not fit int8: int32, and still right (one program: 130 unrolled taps are
    # slow in the interpreter)
    monkeypatch.setitem(max_pool.TUNING, "cpu", dict(SMALL_TILES, tile=4096, bwd_tile=4096,
                                                 max_cols=64, nchw_max_cols=64))
    x = _input((1, 2, 11, 14), channels_last=True)
    _, idx = torch.ops.fastconv.triton_max_pool2d(x, [10, 13], [1, 1], [0, 0], [1, 1], False,
                                                  False, False)
    assert idx.dtype == torch.int32 and int(idx.max()) > 100
    _check_max_pool(x, (10, 13), 1, 0, 1, False, True, False, "10x13 window relu")


def test_max_pool2d_relu_blocks_gradient_of_nonpositive_windows():
    # windows whose maximum is <= 0 must get no gradient with relu=True (stored as index -1)
    x = -_input((1, 2, 6, 6)).abs()
    x[0, 0, 0, 0] = 2.0
    out, idx = torch.ops.fastconv.triton_max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                    False, True)
    assert float(out[0, 0, 0, 0]) == 2.0 and int(idx[0, 0, 0, 0]) == 0
    assert (out.flatten()[1:] == 0).all() and (idx.flatten()[1:] == -1).all()
    xt = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(max_pool.max_pool2d(xt, (2, 2), (2, 2), (0, 0), (1, 1), False,
                                                False, True).sum(), xt)
    assert float(gx[0, 0, 0, 0]) == 1.0 and float(gx.abs().sum()) == 1.0


def test_max_pool2d_strided_input_and_grad():
    # a channel slice (not contiguous in any format) and an expanded (stride 0) gradient
    base = _input((2, 6, 9, 10))
    x = base[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    xt = x.detach().clone().requires_grad_(True)
    out = max_pool.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), False, False, False)
    _exact(out, F.max_pool2d(x.double(), 3, 2, 1), "strided input")
    out = max_pool.max_pool2d(xt, (3, 3), (2, 2), (1, 1), (1, 1), False, False, True)
    out.sum().backward()  # grad_output is an expanded scalar: stride 0 everywhere
    ones = torch.ones_like(out, dtype=torch.float64).to(x.dtype)
    bounds = max_pool_reference(x, 3, 2, 1, 1, False, True, ones)
    assert_within(xt.grad, *bounds["input"], "grad of sum")


def test_max_pool2d_64bit_indexing(monkeypatch):
    monkeypatch.setattr(utils, "FORCE_INDEX64", True)
    for cl in (False, True):
        x = _input((2, 3, 9, 9), channels_last=cl)
        _check_max_pool(x, 3, 2, 1, 1, False, True, False, "int64 indexing")
        _check_max_pool(x, 2, 2, 0, 1, True, False, True, "int64 indexing")


def test_max_pool2d_empty_batch():
    x = torch.empty((0, 3, 8, 8), device=DEV).requires_grad_(True)
    out = max_pool.max_pool2d(x, (2, 2), (2, 2), (0, 0), (1, 1), False, False, True)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_max_pool2d_default_tiles(monkeypatch):
    # the configuration the interpreter really uses (one large program), and the GPU's
    monkeypatch.setitem(max_pool.TUNING, "cpu", dict(max_pool.TUNING["cuda"]))
    for cl in (False, True):
        x = _input((2, 6, 13, 13), channels_last=cl)
        _check_max_pool(x, 3, 2, 0, 1, False, True, False, "gpu tiles")


def test_max_pool2d_eager_path_matches_ops():
    # eager calls bypass the custom-op dispatcher (autograd.Function + cached launch plans);
    # the registered ops run the same launchers: results must be bitwise equal
    for cl in (False, True):
        x = _input((2, 5, 11, 11), channels_last=cl, seed=5)
        g = _input((2, 5, 5, 5), channels_last=cl, seed=6)
        xe = x.clone().requires_grad_(True)
        out = max_pool.max_pool2d(xe, (3, 3), (2, 2), (0, 0), (1, 1), False, False, True)
        assert type(out.grad_fn).__name__ == "_MaxPool2dFnBackward"
        (ge,) = torch.autograd.grad(out, xe, g)
        xo = x.clone().requires_grad_(True)
        ref, idx = torch.ops.fastconv.triton_max_pool2d(xo, [3, 3], [2, 2], [0, 0], [1, 1],
                                                        False, False, True)
        (go,) = torch.autograd.grad(ref, xo, g)
        assert torch.equal(out, ref) and torch.equal(ge, go)
        with torch.no_grad():  # no autograd node at all without grad mode
            assert max_pool.max_pool2d(xe, (3, 3), (2, 2), (0, 0), (1, 1), False, False,
                                   True).grad_fn is None


def test_launch_plans_are_cached_and_follow_tuning(monkeypatch):
    built = []
    plan = max_pool._max_pool2d_plan
    monkeypatch.setattr(max_pool, "_max_pool2d_plan", lambda *a: built.append(1) or plan(*a))
    max_pool._PLANS.clear()
    x = _input((2, 3, 9, 9), channels_last=True)
    args = ((2, 2), (2, 2), (0, 0), (1, 1), False, False, False)
    first = max_pool.max_pool2d(x, *args)
    second = max_pool.max_pool2d(x, *args)
    assert len(built) == 1 and torch.equal(first, second)
    max_pool.max_pool2d(x.contiguous(), *args)  # other strides: another plan
    assert len(built) == 2
    # a changed tuning table invalidates every plan, even when mutated in place
    max_pool.TUNING["cpu"]["tile"] = max_pool.TUNING["cpu"]["tile"] * 2
    third = max_pool.max_pool2d(x, *args)
    assert len(built) == 3 and torch.equal(first, third)


# --------------------------------------------------------------------------- average pools
# (their numerics on every backend: tests/test_avg_pool2d.py)
def _check_avg(fn, op, params, x, what):
    """``fn`` (the Triton op on a tensor) against float64 ``op`` with ``params``, output and
    grad_input within support.avg_pool_reference's elementwise bounds."""
    xt = x.detach().clone().requires_grad_(True)
    out = fn(xt)
    cl = dense_channels_last(x)
    g = torch.randn(out.shape, dtype=torch.float64).to(x.dtype).to(DEV)
    ref = avg_pool_reference(op, x, params, g)
    assert out.shape == ref["output"][0].shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=_fmt(cl)), f"{what}: output lost the memory format"
    assert_within(out, *ref["output"], f"{what} output")
    (gx,) = torch.autograd.grad(out, xt, g)
    assert gx.is_contiguous(memory_format=_fmt(cl)), f"{what}: grad lost the memory format"
    assert_within(gx, *ref["input"], f"{what} grad_input")




def test_avg_pools_eager_path_matches_ops():
    x = _input((2, 4, 9, 9), channels_last=True, seed=7)
    for fn, op, size in (
            (lambda t: avg_pool.avg_pool2d(t, (3, 3), (2, 2), (1, 1), True, False, None),
             lambda t: torch.ops.fastconv.triton_avg_pool2d(t, [3, 3], [2, 2], [1, 1], True,
                                                            False, None), (2, 4, 5, 5)),
            (lambda t: avg_pool.adaptive_avg_pool2d(t, (2, 3)),
             lambda t: torch.ops.fastconv.triton_adaptive_avg_pool2d(t, [2, 3]), (2, 4, 2, 3))):
        g = _input(size, seed=8)
        xe, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yo = fn(xe), op(xo)
        assert type(ye.grad_fn).__name__.endswith("FnBackward")
        assert torch.equal(ye, yo)
        assert torch.equal(torch.autograd.grad(ye, xe, g)[0], torch.autograd.grad(yo, xo, g)[0])


# --------------------------------------------------------------------------- ops, API, dispatch
def test_fake_tensor_shapes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _input((2, 3, 9, 9), channels_last=True)
    real_out, real_idx = torch.ops.fastconv.triton_max_pool2d(x, [3, 3], [2, 2], [1, 1],
                                                              [1, 1], True, False, True)
    real_avg = torch.ops.fastconv.triton_adaptive_avg_pool2d(x, [2, 3])
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fx = mode.from_tensor(x)
        out, idx = torch.ops.fastconv.triton_max_pool2d(fx, [3, 3], [2, 2], [1, 1], [1, 1],
                                                        True, False, True)
        avg = torch.ops.fastconv.triton_adaptive_avg_pool2d(fx, [2, 3])
        gi = torch.ops.fastconv.triton_max_pool2d_backward(
            out, None, idx, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1], True, False, True,
            True)
    assert (out.shape, out.stride(), out.dtype) == (real_out.shape, real_out.stride(), x.dtype)
    assert (idx.stride(), idx.dtype) == (real_idx.stride(), torch.int8)
    assert (avg.shape, avg.stride()) == (real_avg.shape, real_avg.stride())
    assert gi.shape == x.shape and gi.stride() == x.stride()


def test_opcheck():
    x = _input((2, 3, 7, 7), channels_last=True).requires_grad_(True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastconv.triton_max_pool2d.default,
                          (x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, True),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fastconv.triton_avg_pool2d.default,
                          (x, [2, 2], [2, 2], [0, 0], True, True, None), test_utils=utils)
    torch.library.opcheck(torch.ops.fastconv.triton_adaptive_avg_pool2d.default,
                          (x, [1, 1]), test_utils=utils)


def test_why_not():
    ok = dict(input=_input((1, 2, 5, 5)), kernel_size=(3, 3), stride=(2, 2), padding=(0, 0),
              dilation=(1, 1), ceil_mode=False, return_indices=False, relu=False)
    assert max_pool.why_not_max_pool2d(ok) is None
    reason = max_pool.why_not_max_pool2d(dict(ok, input=ok["input"].double()))
    assert reason and "float64" in reason
    reason = max_pool.why_not_max_pool2d(dict(ok, kernel_size=(40, 40)))
    assert reason and "1600 taps" in reason


def test_public_api():
    fc = pytest.importorskip("fastconv")
    x = _input((2, 4, 11, 11), channels_last=True).requires_grad_(True)
    y = fc.functional.max_pool2d(x, 3, 2, padding=1, relu=True, backend="triton")
    m = fc.nn.MaxPool2d(3, 2, 1, relu=True, backend="triton")
    xd = x.detach().double().requires_grad_(True)
    ref = torch.relu(F.max_pool2d(xd, 3, 2, 1))
    _exact(y, ref, "functional")
    _exact(m(x), ref, "nn.MaxPool2d")
    (gx,) = torch.autograd.grad(y.sum(), x)
    ones = torch.ones_like(y)
    assert_within(gx, *max_pool_reference(x, 3, 2, 1, 1, False, True, ones)["input"],
                  "functional grad")
    a = fc.functional.adaptive_avg_pool2d(x, 1, backend="triton")
    assert_within(a, *avg_pool_reference("adaptive_avg_pool2d", x, dict(output_size=1),
                                         None)["output"], "adaptive")
    a = fc.nn.AvgPool2d(2, backend="triton")(x)
    p = dict(kernel_size=2, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None)
    assert_within(a, *avg_pool_reference("avg_pool2d", x, p, None)["output"], "nn.AvgPool2d")


# --------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [
    ("alexnet 3/2", (8, 96, 54, 54), 3, 2, 0), ("vgg 2/2", (8, 64, 32, 32), 2, 2, 0),
    ("stem 3/2/1", (8, 64, 112, 112), 3, 2, 1), ("inception 3/1/1", (8, 192, 28, 28), 3, 1, 1)],
    ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_gpu_bf16_model_shapes(case, channels_last):
    name, shape, k, s, p = case
    x = _input(shape, torch.bfloat16, channels_last)
    _check_max_pool(x, k, s, p, 1, False, True, False, f"bf16 {name}")
    _check_max_pool(x, k, s, p, 1, False, False, True, f"bf16 {name}")
    _check_avg(lambda t: avg_pool.adaptive_avg_pool2d(t, (1, 1)), "adaptive_avg_pool2d",
               dict(output_size=(1, 1)), x, f"bf16 global {name}")


@requires_cuda
def test_gpu_opcheck_and_compile():
    x = _input((4, 16, 13, 13), torch.bfloat16, True).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastconv.triton_max_pool2d.default,
                          (x, [3, 3], [2, 2], [0, 0], [1, 1], False, False, True))
    torch.library.opcheck(torch.ops.fastconv.triton_adaptive_avg_pool2d.default, (x, [1, 1]))

    def f(t):
        y = max_pool.max_pool2d(t, (3, 3), (2, 2), (0, 0), (1, 1), False, False, True)
        return avg_pool.adaptive_avg_pool2d(y, (1, 1)).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    (g1,) = torch.autograd.grad(f(x), x)
    (g2,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(g1, g2)


@requires_cuda
def test_gpu_large_tensor_int64_offsets():
    # > 2**31 elements: 64-bit offsets chosen automatically
    free = torch.cuda.mem_get_info()[0]
    if free < 14 * 2**30:
        pytest.skip("needs 14 GiB of free GPU memory")
    x = torch.empty((2**31 // (64 * 64) + 64, 1, 64, 64), device=DEV, dtype=torch.bfloat16)
    x.normal_()
    assert utils.needs_index64(x)
    out = max_pool.max_pool2d(x, (2, 2), (2, 2), (0, 0), (1, 1), False, False, False)
    tail = x[-3:].float()
    _exact(out[-3:], F.max_pool2d(tail, 2), "tail of a >2**31-element tensor")



@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [("alexnet pool1", (128, 96, 54, 54), 3, 2, 0),
                                  ("vgg 512x4x4", (128, 512, 4, 4), 2, 2, 0),
                                  ("resnet stem", (32, 64, 112, 112), 3, 2, 1)],
                         ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_gpu_bf16_full_batch(case, channels_last):
    name, shape, k, s, p = case
    x = _input(shape, torch.bfloat16, channels_last, seed=9)
    _check_max_pool(x, k, s, p, 1, False, True, False, f"bf16 {name}")


@requires_cuda
def test_gpu_cuda_graph_capture():
    # no host synchronisation on the eager path: a CUDA graph captures forward and backward
    x = _input((16, 64, 27, 27), torch.bfloat16, True, seed=10).requires_grad_(True)
    g = _input((16, 64, 13, 13), torch.bfloat16, True, seed=11)

    def step():
        y = max_pool.max_pool2d(x, (3, 3), (2, 2), (0, 0), (1, 1), False, False, True)
        return y, torch.autograd.grad(y, x, g)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_e, dx_e = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y_g, dx_g = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_g, y_e) and torch.equal(dx_g, dx_e)
