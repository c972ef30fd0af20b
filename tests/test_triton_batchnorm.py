"""Triton batch norm (+ fused ReLU) against float64: outputs, every gradient and the running
statistics, each element within the bound tests/support.py's bn_reference derives (the
statistics' error carried through the normalisation), in training and eval, both memory
formats.

On CPU the kernels run in the Triton interpreter with tiles and chunk counts shrunk so that
every reduction is split into several ragged chunks and channel blocks, as on the GPU. All
buffers the ops allocate are poisoned (NaN) first, so an unwritten element fails the test.
"""
import pytest
import torch
import torch.nn.functional as F

from support import assert_within, bn_reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

bn = pytest.importorskip("fastconv.backends.triton.batch_norm")
utils = pytest.importorskip("fastconv.backends.triton.utils")
from fastconv.shapes import dense_channels_last  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
EPS = 1e-5
# tiny tiles, many chunks per channel block (the ticketed last-program merge), never the
# single-program path: what the GPU does on large layers
SMALL = {"tile": 64, "reduce_tile": 32, "max_channel_block": 4, "programs_per_sm": 24,
         "num_warps": 4, "reduce_warps": 4, "fused_elements": 0, "min_chunk_tiles": 1,
         "max_chunks": 1 << 20}


@pytest.fixture(autouse=True)
def _poison_and_small_tiles(monkeypatch):
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)
    if not HAS_CUDA:
        monkeypatch.setitem(bn.TUNING, "cpu", dict(SMALL))
        monkeypatch.setattr(bn, "_FINALIZE_BLOCK_K", 4)
        monkeypatch.setattr(bn, "_FINALIZE_BLOCK_C", 4)


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _data(shape, dtype=torch.float32, channels_last=False, offset=0.0, seed=0):
    """Input with a different mean and spread per channel, and float32 parameters/stats."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    mean = torch.randn(c, generator=g)[None, :, None, None] * 2 + offset
    spread = (torch.rand(c, generator=g) * 2 + 0.25)[None, :, None, None]
    x = (torch.randn(shape, generator=g) * spread + mean).to(dtype).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=g).to(DEV)
    b = torch.randn(c, generator=g).to(DEV)
    rm = torch.randn(c, generator=g).to(DEV)
    rv = (torch.rand(c, generator=g) + 0.5).to(DEV)
    grad = torch.randn(shape, generator=g).to(dtype).to(DEV)
    return x, w, b, rm, rv, grad


def _run(x, w, b, rm, rv, grad, training, relu, momentum=0.1):
    """(output, [grads of x, w, b]) from the triton op, with rm/rv updated in place."""
    xt = x.detach().clone().requires_grad_(True)
    wt = None if w is None else w.detach().clone().requires_grad_(True)
    bt = None if b is None else b.detach().clone().requires_grad_(True)
    y = bn.batch_norm(xt, rm, rv, wt, bt, training, momentum, EPS, relu)
    leaves = [t for t in (xt, wt, bt) if t is not None]
    return y, torch.autograd.grad(y, leaves, grad)


def _reference(x, w, b, rm, rv, grad, training, relu, out, momentum=0.1):
    """float64 results and elementwise bounds (support.bn_reference); ``rm``/``rv`` as they
    were before the call."""
    return bn_reference(x, w, b, rm, rv, training, momentum, EPS, relu, out, grad)


def _check(x, w, b, rm, rv, grad, training, relu, what, momentum=0.1):
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()
    y, grads = _run(x, w, b, rm, rv, grad, training, relu, momentum)
    ref = _reference(x, w, b, rm0, rv0, grad, training, relu, y, momentum)
    cl = dense_channels_last(x)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=_fmt(cl)), what
    assert grads[0].is_contiguous(memory_format=_fmt(cl)), f"{what}: grad_input layout"
    assert_within(y, *ref["output"], f"{what} output")
    names = ["input"] + [n for n, t in (("weight", w), ("bias", b)) if t is not None]
    for name, gr, leaf in zip(names, grads, (x, w, b)):
        assert gr.dtype == (x if name == "input" else {"weight": w, "bias": b}[name]).dtype
        assert_within(gr, *ref[name], f"{what} grad {name}")
    if rm is not None:
        for name, got, before in (("running_mean", rm, rm0), ("running_var", rv, rv0)):
            if name in ref:
                assert_within(got, *ref[name], f"{what} {name}")
            else:  # eval leaves the statistics alone
                assert torch.equal(got, before), f"{what}: eval changed {name}"
    return y, grads


# MODELS.md batch-norm layers, scaled down (N, C, H, W)
SHAPES = [
    ("vgg16-bn conv", (4, 8, 8, 8)),
    ("resnet stem", (2, 4, 12, 12)),
    ("lenet-bn", (3, 6, 7, 7)),
    ("vgg16-bn last stage 2x2", (4, 12, 2, 2)),
    ("1x1 pixels", (8, 5, 1, 1)),
    ("odd", (3, 5, 7, 9)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training,relu", [(True, True), (True, False), (False, True)],
                         ids=["train-relu", "train", "eval-relu"])
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_batch_norm_model_shapes(case, training, relu, channels_last):
    name, shape = case
    x, w, b, rm, rv, grad = _data(shape, channels_last=channels_last)
    rm0, rv0 = rm.clone(), rv.clone()
    _check(x, w, b, rm, rv, grad, training, relu, name)
    if training:
        assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch the stats"


# the launch structures the planner picks from (see batchnorm.py): one program per channel
# block that also normalises / computes dx (small layers), several chunks merged by the last
# program of each channel block (large layers), and a single chunk left by the chunk planner
PATHS = {
    "one-program": dict(SMALL, fused_elements=1 << 30),
    "chunked": dict(SMALL),
    "chunked-wide": dict(SMALL, reduce_tile=256, max_channel_block=16, programs_per_sm=3,
                         min_chunk_tiles=2, max_chunks=3),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 10, 2, 2), (5, 3, 9, 4)], ids=str)
def test_launch_paths(monkeypatch, path, shape, channels_last):
    monkeypatch.setitem(bn.TUNING, "cpu", PATHS[path])
    x, w, b, rm, rv, grad = _data(shape, channels_last=channels_last, seed=40)
    red = bn._reduce_plan(shape, channels_last, x.device, x.element_size())
    if path == "one-program":
        assert red["single"] and red["grid"][0] == 1
    elif path == "chunked":
        assert not red["single"] and red["chunks"] > 1
    for training, relu in ((True, True), (True, False), (False, True)):
        _check(x, w, b, rm.clone(), rv.clone(), grad, training, relu,
               f"{path} training={training} relu={relu}")
    # every launch leaves its tickets zeroed for the next one
    assert all(int(t.abs().sum()) == 0 for t in bn._TICKETS.values())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eager_path_matches_ops(channels_last):
    # eager calls run the launchers under one autograd.Function; the registered ops (what
    # torch.compile sees) run the same kernels: bitwise equal results and statistics
    x, w, b, rm, rv, grad = _data((3, 6, 5, 5), channels_last=channels_last, seed=41)
    for training in (True, False):
        xe, we, be = (t.clone().requires_grad_(True) for t in (x, w, b))
        rme, rve = rm.clone(), rv.clone()
        ye = bn.batch_norm(xe, rme, rve, we, be, training, 0.1, EPS, True)
        assert type(ye.grad_fn).__name__ == "_BatchNormFnBackward"
        ge = torch.autograd.grad(ye, [xe, we, be], grad)
        xo, wo, bo = (t.clone().requires_grad_(True) for t in (x, w, b))
        rmo, rvo = rm.clone(), rv.clone()
        centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(
            xo.detach(), rmo, rvo, training, 0.1, EPS)
        yo = torch.ops.fastconv.triton_batch_norm(xo, wo, bo, centre, invstd, training, True)
        go = torch.autograd.grad(yo, [xo, wo, bo], grad)
        assert torch.equal(ye, yo) and all(torch.equal(a, c) for a, c in zip(ge, go))
        assert torch.equal(rme, rmo) and torch.equal(rve, rvo)
        with torch.no_grad():  # inference: one launch straight from the running statistics
            yi = bn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, EPS, True)
        assert yi.grad_fn is None
        ref = _reference(x, w, b, rm, rv, None, training, True, yi)
        assert_within(yi, *ref["output"], f"no-grad training={training}")


def test_running_stats_version_bumped():
    # as torch's in-place update: autograd sees the running statistics change
    x, w, b, rm, rv, _ = _data((2, 4, 3, 3), seed=42)
    v0, v1 = rm._version, rv._version
    bn.batch_norm(x.requires_grad_(True), rm, rv, w, b, True, 0.1, EPS, False)
    assert rm._version > v0 and rv._version > v1


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_mask_recomputed_from_input(monkeypatch, training, channels_last):
    monkeypatch.setattr(bn, "RELU_MASK_FROM_OUTPUT", False)
    x, w, b, rm, rv, grad = _data((3, 6, 7, 5), channels_last=channels_last, seed=8)
    _check(x, w, b, rm, rv, grad, training, True, "mask from x")
    x, _, b, rm, rv, grad = _data((3, 6, 7, 5), torch.float16, channels_last, seed=9)
    _check(x, None, b, rm, rv, grad, training, True, "mask from x, fp16, no weight")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_without_relu(channels_last):
    x, w, b, rm, rv, grad = _data((3, 5, 7, 9), channels_last=channels_last, seed=1)
    _check(x, w, b, rm, rv, grad, False, False, "eval")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True])
def test_large_mean_offset(channels_last, relu):
    # channel means near 1e4 with spreads near 1: naive float32 sum/sum-of-squares loses the
    # variance entirely (ulp(1e8) = 8); shifted Welford keeps float32 accuracy
    x, w, b, rm, rv, grad = _data((4, 6, 7, 7), channels_last=channels_last, offset=1e4,
                                  seed=2)
    _check(x, w, b, rm, rv, grad, True, relu, "offset 1e4")
    _check(x, w, b, rm, rv, grad, False, relu, "offset 1e4 eval")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float16_with_float32_parameters(channels_last):
    # autocast's case: half input, float32 weight/bias/running statistics
    x, w, b, rm, rv, grad = _data((4, 6, 7, 7), torch.float16, channels_last, seed=3)
    y, grads = _check(x, w, b, rm, rv, grad, True, True, "fp16 train relu")
    assert grads[0].dtype == torch.float16 and rm.dtype == torch.float32
    _check(x, w, b, rm, rv, grad, False, False, "fp16 eval")


def test_half_parameters_and_running_stats():
    # model.half(): every tensor float16 (statistics still computed in float32)
    x, w, b, rm, rv, grad = _data((4, 6, 5, 5), torch.float16, True, seed=4)
    w, b, rm, rv = w.half(), b.half(), rm.half(), rv.half()
    y, grads = _check(x, w, b, rm, rv, grad, True, True, "half params")
    assert grads[1].dtype == torch.float16 and grads[2].dtype == torch.float16
    assert rm.dtype == torch.float16


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_no_affine_no_running_stats(channels_last):
    x, _, _, _, _, grad = _data((3, 5, 6, 6), channels_last=channels_last, seed=5)
    _check(x, None, None, None, None, grad, True, True, "no affine, no stats")
    _check(x, None, None, None, None, grad, True, False, "no affine, no stats")


def test_bias_only_and_weight_only():
    x, w, b, rm, rv, grad = _data((3, 5, 6, 6), seed=6)
    _check(x, None, b, rm.clone(), rv.clone(), grad, True, True, "bias only")
    _check(x, w, None, rm.clone(), rv.clone(), grad, True, False, "weight only")


@pytest.mark.parametrize("training", [True, False])
def test_gradient_subsets(training):
    # only the parameters need gradients (a frozen input), or only the input
    x, w, b, rm, rv, grad = _data((3, 5, 6, 6), channels_last=True, seed=7)
    wt, bt = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = bn.batch_norm(x, rm.clone(), rv.clone(), wt, bt, training, 0.1, EPS, True)
    dw, db = torch.autograd.grad(y, [wt, bt], grad)
    ref = _reference(x, w, b, rm, rv, grad, training, True, y)
    assert_within(dw, *ref["weight"], "grad_weight alone")
    assert_within(db, *ref["bias"], "grad_bias alone")
    xt = x.clone().requires_grad_(True)
    y = bn.batch_norm(xt, rm.clone(), rv.clone(), w, b, training, 0.1, EPS, True)
    (dx,) = torch.autograd.grad(y, [xt], grad)
    ref = _reference(x, w, b, rm, rv, grad, training, True, y)
    assert_within(dx, *ref["input"], "grad_input alone")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_running_stats_after_several_steps(momentum, channels_last):
    # each step against float64 from the statistics the module holds; the running statistics'
    # bounds accumulate over the steps as (1 - momentum) times the last plus the new one
    fc = pytest.importorskip("fastconv")
    c = 6
    ours = fc.nn.BatchNorm2d(c, momentum=momentum, relu=True, backend="triton").to(DEV)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    brm = brv = torch.zeros(c, dtype=torch.float64)
    for step in range(3):
        x, *_ = _data((4, c, 5, 5), channels_last=channels_last, seed=10 + step)
        rm0, rv0 = ours.running_mean.clone(), ours.running_var.clone()
        y = ours(x)
        f = 1 / (step + 1) if momentum is None else momentum
        ref = bn_reference(x, ours.weight, ours.bias, rm0, rv0, True, f, EPS, True, y, None)
        assert_within(y, *ref["output"], f"step {step} output")
        (rm, drm), (rv, drv) = ref["running_mean"], ref["running_var"]
        brm, brv = (1 - f) * brm + drm.cpu(), (1 - f) * brv + drv.cpu()
        assert_within(ours.running_mean, rm, brm, f"step {step} running_mean")
        assert_within(ours.running_var, rv, brv, f"step {step} running_var")
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    x, *_ = _data((2, c, 5, 5), channels_last=channels_last, seed=20)
    y = ours(x)
    ref = bn_reference(x, ours.weight, ours.bias, ours.running_mean, ours.running_var, False,
                       None, EPS, True, y, None)
    assert_within(y, *ref["output"], "eval")


def test_module_without_running_stats():
    fc = pytest.importorskip("fastconv")
    ours = fc.nn.BatchNorm2d(5, affine=False, track_running_stats=False,
                             backend="triton").to(DEV)
    x, *_ = _data((3, 5, 6, 6), seed=21)
    ref = bn_reference(x, None, None, None, None, True, 0.1, EPS, False, None, None)
    assert_within(ours(x), *ref["output"], "stats-free module")
    ours.eval()  # still batch statistics: there are none to use
    assert_within(ours(x), *ref["output"], "stats-free eval")


def test_functional_api():
    fc = pytest.importorskip("fastconv")
    x, w, b, rm, rv, grad = _data((3, 5, 6, 6), channels_last=True, seed=22)
    xt = x.clone().requires_grad_(True)
    y = fc.functional.batch_norm(xt, rm.clone(), rv.clone(), w, b, training=True, relu=True,
                                 backend="triton")
    ref = _reference(x, w, b, rm, rv, grad, True, True, y)
    assert_within(y, *ref["output"], "functional output")
    (dx,) = torch.autograd.grad(y, [xt], grad)
    assert_within(dx, *ref["input"], "functional grad")


def test_deterministic():
    x, w, b, rm, rv, grad = _data((4, 6, 7, 7), channels_last=True, seed=23)
    y1, g1 = _run(x, w, b, rm.clone(), rv.clone(), grad, True, True)
    y2, g2 = _run(x, w, b, rm.clone(), rv.clone(), grad, True, True)
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_non_contiguous_input_and_grad():
    x, w, b, rm, rv, _ = _data((3, 10, 6, 6), seed=24)
    x = x[:, ::2]  # neither NCHW- nor NHWC-contiguous
    g = torch.randn(3, 5, 6, 6, device=DEV).transpose(2, 3).contiguous().transpose(2, 3)
    _check(x, w[:5], b[:5], rm[:5].clone(), rv[:5].clone(), g, True, True, "strided")


def test_64bit_indexing(monkeypatch):
    monkeypatch.setattr(utils, "FORCE_INDEX64", True)
    for cl in (False, True):
        x, w, b, rm, rv, grad = _data((3, 5, 7, 9), channels_last=cl, seed=25)
        _check(x, w, b, rm, rv, grad, True, True, "int64 indexing")


def test_default_tiles(monkeypatch):
    # the interpreter's own configuration, and the GPU's (smaller tiles, many programs)
    for cfg in (bn.TUNING["cpu"], bn.TUNING["cuda"]):
        monkeypatch.setitem(bn.TUNING, "cpu", dict(cfg, programs_per_sm=4))
        for cl in (False, True):
            x, w, b, rm, rv, grad = _data((4, 6, 9, 9), channels_last=cl, seed=26)
            _check(x, w, b, rm, rv, grad, True, True, "default tiles")


def test_ops_fake_tensors_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b, rm, rv, grad = _data((2, 5, 4, 4), channels_last=True, seed=27)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastconv.triton_batch_norm_stats.default,
                          (x, rm.clone(), rv.clone(), True, 0.1, EPS), test_utils=utils)
    centre, mean, invstd = torch.ops.fastconv.triton_batch_norm_stats(x, None, None, True,
                                                                       0.1, EPS)
    xg = x.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fastconv.triton_batch_norm.default,
                          (xg, w, b, centre, invstd, True, True),
                          test_utils=utils + ("test_autograd_registration",))
    for y in (x, None):  # the ReLU mask from a saved output, or recomputed from x
        torch.library.opcheck(torch.ops.fastconv.triton_batch_norm_backward.default,
                              (grad, x, y, w, b, centre, invstd, True, True, [True] * 3),
                              test_utils=utils)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fc, fm, fi = torch.ops.fastconv.triton_batch_norm_stats(fx, None, None, True, 0.1, EPS)
        fy = torch.ops.fastconv.triton_batch_norm(fx, None, None, fc, fi, True, False)
    assert fc.shape == (2, 5) and fm.shape == fi.shape == (5,) and fm.dtype == torch.float32
    assert fy.shape == x.shape and fy.stride() == x.stride()


def test_why_not():
    x, w, b, rm, rv, _ = _data((2, 3, 4, 4))
    ok = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
              momentum=0.1, eps=EPS, relu=False)
    assert bn.why_not_batch_norm(ok) is None
    assert "float64" in bn.why_not_batch_norm(dict(ok, input=x.double()))
    assert "non-empty" in bn.why_not_batch_norm(dict(ok, input=x[:0]))
    assert "weight" in bn.why_not_batch_norm(dict(ok, weight=w.double()))


# --------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(16, 64, 32, 32), (16, 512, 2, 2), (16, 64, 56, 56),
                                   (16, 256, 14, 14)], ids=str)
def test_gpu_bf16_model_shapes(shape, channels_last):
    x, w, b, rm, rv, grad = _data(shape, torch.bfloat16, channels_last, seed=30)
    _check(x, w, b, rm, rv, grad, True, True, "bf16 train relu")
    _check(x, w, b, rm, rv, grad, False, False, "bf16 eval")
    x, w, b, rm, rv, grad = _data(shape, torch.bfloat16, channels_last, offset=100.0, seed=31)
    _check(x, w, b, rm, rv, grad, True, False, "bf16 offset 100")


@requires_cuda
def test_gpu_large_offset_float32_full_size():
    x, w, b, rm, rv, grad = _data((128, 64, 28, 28), torch.float32, True, offset=1e4, seed=32)
    _check(x, w, b, rm, rv, grad, True, True, "fp32 offset 1e4 batch 128")


@requires_cuda
def test_gpu_opcheck_and_compile():
    x, w, b, rm, rv, grad = _data((8, 16, 9, 9), torch.bfloat16, True, seed=33)
    torch.library.opcheck(torch.ops.fastconv.triton_batch_norm_stats.default,
                          (x, rm.clone(), rv.clone(), True, 0.1, EPS))
    centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(x, None, None, True, 0.1,
                                                                   EPS)
    torch.library.opcheck(torch.ops.fastconv.triton_batch_norm.default,
                          (x.clone().requires_grad_(True), w, b, centre, invstd, True, True))
    rm_e, rv_e, rm_c, rv_c = rm.clone(), rv.clone(), rm.clone(), rv.clone()

    def step(t, rmean, rvar):
        return bn.batch_norm(t, rmean, rvar, w, b, True, 0.1, EPS, True).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad(step(xe, rm_e, rv_e), xe)
    (gc,) = torch.autograd.grad(compiled(xc, rm_c, rv_c), xc)
    torch.testing.assert_close(ge, gc)
    torch.testing.assert_close(rm_e, rm_c)  # the in-place update survives functionalization
    torch.testing.assert_close(rv_e, rv_c)



@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(128, 512, 4, 4), (128, 512, 7, 7), (128, 256, 8, 8),
                                   (32, 64, 112, 112)], ids=str)
def test_gpu_bf16_full_batch_paths(shape, channels_last):
    # batch-128 layers on both sides of the one-program / chunked boundary (GPU tuning)
    x, w, b, rm, rv, grad = _data(shape, torch.bfloat16, channels_last, seed=35)
    _check(x, w, b, rm, rv, grad, True, True, f"bf16 {shape}")
    assert all(int(t.abs().sum()) == 0 for t in bn._TICKETS.values())


@requires_cuda
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (64, 512, 2, 2)], ids=str)
def test_gpu_cuda_graph_and_streams(shape):
    # graph capture fails on any host synchronisation: the eager path has none. Replays with
    # new data match eager runs; two streams running at once keep separate tickets.
    x, w, b, rm, rv, grad = _data(shape, torch.bfloat16, True, seed=36)
    static_x = x.clone().requires_grad_(True)
    rm_g, rv_g = rm.clone(), rv.clone()

    def step():
        y = bn.batch_norm(static_x, rm_g, rv_g, w, b, True, 0.1, EPS, True)
        return y, torch.autograd.grad(y, [static_x], grad)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y_g, dx_g = step()
    for seed in (37, 38):
        x2, *_ = _data(shape, torch.bfloat16, True, seed=seed)
        with torch.no_grad():
            static_x.copy_(x2)
        graph.replay()
        xe = x2.clone().requires_grad_(True)
        ye = bn.batch_norm(xe, rm.clone(), rv.clone(), w, b, True, 0.1, EPS, True)
        (dxe,) = torch.autograd.grad(ye, [xe], grad)
        torch.cuda.synchronize()
        assert torch.equal(y_g, ye) and torch.equal(dx_g, dxe)
    streams = [torch.cuda.Stream() for _ in range(2)]
    inputs = [_data(shape, torch.bfloat16, True, seed=40 + i)[0] for i in range(2)]
    want = [bn.batch_norm(t, None, None, w, b, True, 0.1, EPS, True) for t in inputs]
    for _ in range(20):
        got = []
        for s, t in zip(streams, inputs):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                got.append(bn.batch_norm(t, None, None, w, b, True, 0.1, EPS, True))
        torch.cuda.synchronize()
        assert all(torch.equal(g, r) for g, r in zip(got, want))


def test_inference_mode_training_batch_norm():
    # inference tensors have no version counter: the running-stat update must not try to bump it
    x, w, b, rm, rv, grad = _data((3, 5, 4, 4), seed=43)
    with torch.inference_mode():
        rmi, rvi = rm.clone(), rv.clone()
        y = bn.batch_norm(x, rmi, rvi, w, b, True, 0.1, EPS, True)
    ref = _reference(x, w, b, rm, rv, None, True, True, y)
    assert_within(y, *ref["output"], "inference-mode output")
    assert not torch.equal(rmi, rm)
