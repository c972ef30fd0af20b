"""batch_norm with a residual, ``relu(bn(x) + residual)`` (and ``bn(x) + residual``), on every
backend against float64: output, the gradients of input, weight, bias and residual, running
statistics; training and eval, relu on/off, affine on/off, both memory formats; bad residuals
refused before any state changes; and ``convert`` fusing ResNet's block endings into it.

Bounds: the batch norm part is support.bn_reference's (statistics' error carried through the
normalisation); the residual adds one rounding of the sum (torch's add, or the fused kernel's
single store). The residual's gradient is grad_output masked by the kernel's own ReLU mask
(which must agree with float64 wherever the pre-activation is beyond its bound of zero):
exact, so its bound is 0. On CPU the Triton kernels run in the interpreter with tiles that
split every plane (>= 64 elements in the 8x8 cases) into several tiles, chunks and channel
blocks ("chunked"), and with the one-program launch that fuses the elementwise passes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastconv
import support
from fastconv import dispatch
from fastconv import nn as fnn
from support import U, assert_layout, assert_within

tbn = pytest.importorskip("fastconv.backends.triton.batch_norm")

SMALL = {"tile": 64, "reduce_tile": 32, "max_channel_block": 4, "programs_per_sm": 24,
         "num_warps": 4, "reduce_warps": 4, "fused_elements": 0, "min_chunk_tiles": 1,
         "max_chunks": 1 << 20}
PATHS = {"chunked": SMALL, "one-program": dict(SMALL, fused_elements=1 << 30)}
GRADS = ("input", "weight", "bias", "residual")


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """The Triton interpreter's launch structure (the GPU keeps its own tuning)."""
    if not torch.cuda.is_available():
        monkeypatch.setitem(tbn.TUNING, "cpu", dict(PATHS[request.param]))
        monkeypatch.setattr(tbn, "_FINALIZE_BLOCK_K", 4)
        monkeypatch.setattr(tbn, "_FINALIZE_BLOCK_C", 4)
    return request.param


def make(shape, device="cpu", *, channels_last=False, affine=True, stats=True, seed=()):
    """Input with a different mean and spread per channel, a residual of the same size as the
    normalised values (so the ReLU cuts about half), float32 parameters and statistics."""
    gen = support.generator("bn-residual", shape, channels_last, affine, stats, *seed)
    c = shape[1]
    mean = torch.randn(c, generator=gen, dtype=torch.float64) * 2
    sd = torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.25
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * sd.view(1, -1, 1, 1) \
        + mean.view(1, -1, 1, 1)
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r = (t.float().to(device).contiguous(memory_format=fmt) for t in (x, r))
    args = dict(input=x, running_mean=None, running_var=None, weight=None, bias=None)
    if affine:
        args["weight"] = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1).float()
        args["bias"] = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).float()
    if stats:
        args["running_mean"] = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).float()
        args["running_var"] = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).float()
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return args, r, gen


def residual_reference(x, r, weight, bias, running_mean, running_var, training, momentum, eps,
                       relu, out, grad_out):
    """float64 output, gradients and running statistics of relu(bn(x) + r), with bounds."""
    lin = support.bn_reference(x, weight, bias, running_mean, running_var, training, momentum,
                               eps, False, None, None)
    ref_lin, bound_lin = lin["output"]
    pre = ref_lin + r.double()
    bound = bound_lin + U[x.dtype] * pre.abs()  # the add's rounding (or the fused store's)
    res = dict(lin, output=(torch.relu(pre) if relu else pre, bound))
    if grad_out is None:
        return res
    g = grad_out.double()
    if relu:
        mask = out.detach().double() > 0
        assert bool(((mask == (pre > 0)) | (pre.abs() <= bound)).all()), \
            "ReLU mask differs beyond rounding"
        g = g * mask
    grads = support.bn_reference(x, weight, bias, running_mean, running_var, training,
                                 momentum, eps, False, None, g)
    res.update({k: grads[k] for k in ("input", "weight", "bias") if k in grads})
    res["residual"] = (g, 0.0)
    return res


def require(backend, args):
    """Skip a backend that cannot run here, or whose why_not refuses a residual."""
    support.require(backend, args["input"].device.type)
    reason = dispatch.reasons("batch_norm", args, [backend])[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run batch_norm with a residual: {reason}")


def check(backend, args, r, gen, *, training, relu, momentum=0.1, eps=1e-5, wants=GRADS,
          what=""):
    x = args["input"]
    a = dict(args, training=training, momentum=momentum, eps=eps, relu=relu, residual=r)
    require(backend, fastconv.checks.check_batch_norm(**a))
    g = support.grad_for(x.shape, gen, x.dtype, x.device)
    out, _, grads, used = support.run("batch_norm", a, backend, g, wants=wants)
    assert out.dtype == x.dtype
    assert_layout(out, x, f"{what} output")
    ref = residual_reference(x, r, args["weight"], args["bias"], args["running_mean"],
                             args["running_var"], training, momentum, eps, relu, out, g)
    assert_within(out, *ref["output"], f"{what} output")
    assert set(grads) == {n for n in wants if a.get(n) is not None}, what
    if "input" in grads:
        assert_layout(grads["input"], x, f"{what} grad_input")
    for name, got in grads.items():
        assert got.dtype == a[name].dtype, f"{what} grad {name} dtype"
        assert_within(got, *ref[name], f"{what} grad {name}")
    if args["running_mean"] is not None:
        for name in ("running_mean", "running_var"):
            if training:
                assert_within(used[name], *ref[name], f"{what} {name}")
            else:
                assert torch.equal(used[name], args[name]), f"{what}: eval changed {name}"
    return out


BACKENDS = [pytest.param(b, id=b) for b in ("torch", "triton", "extension")]
CASES = [  # (id, shape, make() options); 8x8 planes: several tiles per plane
    ("8x8", (2, 3, 8, 8), {}),
    ("8x8 nhwc", (2, 5, 8, 8), dict(channels_last=True)),
    ("odd no affine", (3, 5, 3, 7), dict(affine=False)),
    ("odd nhwc no stats", (3, 6, 5, 3), dict(channels_last=True, stats=False)),
]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual(backend, case, training, relu, path):
    name, shape, mk = case
    if path != "chunked" and backend != "triton":
        pytest.skip("launch paths are the Triton backend's")
    if not training and not mk.get("stats", True):
        pytest.skip("eval without running statistics is training (test_batch_norm.py)")
    args, r, gen = make(shape, **mk)
    check(backend, args, r, gen, training=training, relu=relu,
          what=f"{backend} {name} {path} training={training} relu={relu}")


@pytest.mark.parametrize("wants", [("residual",), ("weight", "residual"), ("input", "residual"),
                                   ("input", "weight")], ids="+".join)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_gradient_subsets(wants, training, path):
    # which pass writes grad_residual depends on what else is wanted: the dx pass, the fused
    # one-program loop, the reduction loop, or a dx pass writing only grad_residual
    for cl in (False, True):
        args, r, gen = make((2, 4, 5, 6), channels_last=cl, seed=(wants, training))
        check("triton", args, r, gen, training=training, relu=True, wants=wants,
              what=f"{'+'.join(wants)} nhwc={cl} {path}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_without_autograd(training, path):
    # no graph: eval is one launch reading the running statistics, training the statistics
    # kernel (fused with the output in the one-program path) then the apply kernel
    for cl in (False, True):
        args, r, _ = make((2, 3, 8, 8), channels_last=cl, seed=("nograd", training))
        rm, rv = args["running_mean"].clone(), args["running_var"].clone()
        with torch.no_grad():
            out = fastconv.functional.batch_norm(
                args["input"], rm, rv, args["weight"], args["bias"], training, relu=True,
                residual=r, backend="triton")
        assert out.grad_fn is None
        assert_layout(out, args["input"], "no-grad output")
        ref = residual_reference(args["input"], r, args["weight"], args["bias"],
                                 args["running_mean"], args["running_var"], training, 0.1, 1e-5,
                                 True, out, None)
        assert_within(out, *ref["output"], f"no-grad nhwc={cl} {path}")
        if training:
            assert_within(rm, *ref["running_mean"], "no-grad running_mean")


def test_triton_float16():
    args, r, gen = make((2, 3, 8, 8), channels_last=True, seed=("fp16",))
    args["input"], r = args["input"].half(), r.half()
    for training in (True, False):
        check("triton", args, r, gen, training=training, relu=True, eps=1e-3,
              what=f"fp16 training={training}")


def test_triton_eager_path_matches_ops():
    # the eager autograd.Function and the registered ops (what torch.compile sees) run the
    # same kernels and share one autograd formula: bitwise equal results
    args, r, _ = make((3, 6, 5, 5), channels_last=True, seed=("ops",))
    x, w, b, rm, rv = (args[k] for k in ("input", "weight", "bias", "running_mean",
                                         "running_var"))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    for training in (True, False):
        for relu in (True, False):
            xe, we, be, re = (t.clone().requires_grad_(True) for t in (x, w, b, r))
            ye = tbn.batch_norm(xe, rm.clone(), rv.clone(), we, be, training, 0.1, 1e-5, relu,
                                re)
            assert type(ye.grad_fn).__name__ == "_BatchNormFnBackward"
            ge = torch.autograd.grad(ye, [xe, we, be, re], g)
            xo, wo, bo, ro = (t.clone().requires_grad_(True) for t in (x, w, b, r))
            centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(
                xo.detach(), rm.clone(), rv.clone(), training, 0.1, 1e-5)
            yo = torch.ops.fastconv.triton_batch_norm(xo, wo, bo, centre, invstd, training,
                                                      relu, ro)
            go = torch.autograd.grad(yo, [xo, wo, bo, ro], g)
            assert torch.equal(ye, yo)
            assert all(torch.equal(p, q) for p, q in zip(ge, go)), (training, relu)


def test_triton_ops_opcheck_and_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, r, _ = make((2, 5, 4, 4), channels_last=True, seed=("opcheck",))
    x, w, b = args["input"], args["weight"], args["bias"]
    centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(x, None, None, True, 0.1,
                                                                   1e-5)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for relu in (True, False):
        torch.library.opcheck(torch.ops.fastconv.triton_batch_norm.default,
                              (x.clone().requires_grad_(True), w, b, centre, invstd, True, relu,
                               r.clone().requires_grad_(True)), test_utils=utils)
    y = torch.ops.fastconv.triton_batch_norm(x, w, b, centre, invstd, True, True, r)
    torch.library.opcheck(torch.ops.fastconv.triton_batch_norm_backward.default,
                          (torch.randn_like(x), x, y, w, b, centre, invstd, True, True,
                           [True] * 4), test_utils=utils[:2])
    with FakeTensorMode() as mode:
        fx, fr = mode.from_tensor(x), mode.from_tensor(r)
        fc, _, fi = torch.ops.fastconv.triton_batch_norm_stats(fx, None, None, True, 0.1, 1e-5)
        fy = torch.ops.fastconv.triton_batch_norm(fx, None, None, fc, fi, True, True, fr)
        outs = torch.ops.fastconv.triton_batch_norm_backward(fy, fx, fy, None, None, fc, fi,
                                                             True, True, [True] * 4)
    assert fy.shape == x.shape and fy.stride() == x.stride()
    assert outs[3].shape == x.shape and outs[3].stride() == x.stride()


# --------------------------------------------------------------------------- module vs stock
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_running_stats_as_stock(backend, momentum):
    """fastconv.nn.BatchNorm2d(relu=True)(x, residual) over three training steps, then eval,
    against torch.nn.BatchNorm2d then add and ReLU: the torch backend bitwise, the Triton one
    within the float64 bounds carried from step to step."""
    support.require(backend)
    c = 4
    mod = fnn.BatchNorm2d(c, momentum=momentum, relu=True, backend=backend)
    stock = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        mod.weight.copy_(torch.linspace(0.5, 1.5, c))
        mod.bias.copy_(torch.linspace(-0.3, 0.3, c))
    stock.load_state_dict(mod.state_dict())
    brm = brv = torch.zeros(c, dtype=torch.float64)
    for step in range(3):
        args, r, _ = make((2, c, 4, 5), stats=False, affine=False, seed=(step,))
        x = args["input"]
        rm0, rv0 = mod.running_mean.clone(), mod.running_var.clone()
        y = mod(x, r)
        want = torch.relu(stock(x) + r)
        if backend == "torch":
            assert torch.equal(y, want)
            for k, v in stock.state_dict().items():
                assert torch.equal(mod.state_dict()[k], v), (step, k)
            continue
        f = 1 / (step + 1) if momentum is None else momentum
        ref = residual_reference(x, r, mod.weight, mod.bias, rm0, rv0, True, f, 1e-5, True,
                                 y, None)
        assert_within(y, *ref["output"], f"step {step} output")
        (rm, drm), (rv, drv) = ref["running_mean"], ref["running_var"]
        brm, brv = (1 - f) * brm + drm, (1 - f) * brv + drv
        assert_within(mod.running_mean, rm, brm, f"step {step} running_mean")
        assert_within(mod.running_var, rv, brv, f"step {step} running_var")
    assert int(mod.num_batches_tracked) == int(stock.num_batches_tracked) == 3
    mod.eval()
    stock.eval()
    args, r, _ = make((2, c, 4, 5), stats=False, seed=("eval",))
    y = mod(args["input"], r)
    ref = residual_reference(args["input"], r, mod.weight, mod.bias, mod.running_mean,
                             mod.running_var, False, None, 1e-5, True, y, None)
    assert_within(y, *ref["output"], "eval output")
    if backend == "torch":
        assert torch.equal(y, torch.relu(stock(args["input"]) + r))


# --------------------------------------------------------------------------- bad residuals
def _bad_residuals(x):
    return [
        ("shape", x[:, :, :, :-1].contiguous(), ValueError, ["residual", str(tuple(x.shape)),
                                                             str(tuple(x[..., :-1].shape))]),
        ("channels", x[:, :-1].contiguous(), ValueError, ["residual", str(tuple(x.shape))]),
        ("dtype", x.double(), TypeError, ["residual", "float64", "float32"]),
        ("format", x.contiguous(memory_format=torch.channels_last), ValueError,
         ["residual", "channels_last", "NCHW", str(tuple(x.shape))]),
        ("not a tensor", 1.0, TypeError, ["residual", "float"]),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_residual_raises_before_state_changes(backend):
    support.require(backend)
    args, _, _ = make((2, 3, 4, 5), seed=("bad",))
    x = args["input"]
    mod = fnn.BatchNorm2d(3, relu=True, backend=backend)
    for what, bad, kind, words in _bad_residuals(x):
        before = {k: v.clone() for k, v in mod.state_dict().items()}
        with pytest.raises(kind) as exc:
            mod(x, bad)
        for word in words:
            assert word in str(exc.value), (what, word, str(exc.value))
        for k, v in mod.state_dict().items():
            assert torch.equal(v, before[k]), f"{what}: {k} changed"
        rm, rv = args["running_mean"].clone(), args["running_var"].clone()
        with pytest.raises(kind):
            fastconv.functional.batch_norm(x, rm, rv, training=True, relu=True, residual=bad,
                                           backend=backend)
        assert torch.equal(rm, args["running_mean"]) and torch.equal(rv, args["running_var"])
    # a channels_last input with an NCHW residual: the other direction of the format rule
    xc = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="residual is contiguous .NCHW.*channels_last"):
        mod(xc, x)
    centre, _, invstd = torch.ops.fastconv.triton_batch_norm_stats(x, None, None, True, 0.1,
                                                                   1e-5)
    with pytest.raises(ValueError, match="residual"):  # the registered op checks it too
        torch.ops.fastconv.triton_batch_norm(x, None, None, centre, invstd, True, True,
                                             x[:, :, :, :-1].contiguous())


# --------------------------------------------------------------------------- convert
torchvision = pytest.importorskip("torchvision")

_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default,
             torch.ops.aten.threshold.default, torch.ops.aten.threshold_.default}
_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_OPS = ("conv2d_relu", "max_pool2d", "batch_norm", "avg_pool2d", "adaptive_avg_pool2d")


class OutsideFastconv(TorchDispatchMode):
    """Records ATen ReLU calls and adds of feature maps (4-D floating tensors) made outside
    fastconv's ops, and the adds made inside its batch norm. With the torch backend fastconv's
    ops are themselves plain ATen calls, so the backend's methods (and the functions its
    ``bind`` returns) are wrapped to say when a call is inside one (``inside``: the op's
    name)."""

    def __init__(self):
        super().__init__()
        self.inside = None
        self.outside = []
        self.bn_adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        feature_add = func in _ADD_OPS and isinstance(out, torch.Tensor) and out.dim() == 4 \
            and out.is_floating_point()
        if self.inside is None and (func in _RELU_OPS or feature_add):
            self.outside.append(str(func))
        elif self.inside == "batch_norm" and feature_add:
            self.bn_adds += 1
        return out


@pytest.fixture
def watch(monkeypatch):
    mode = OutsideFastconv()
    backend = dispatch.BACKENDS["torch"]
    for op in _OPS:
        method = getattr(backend, op)

        def wrapped(*a, _op=op, _method=method):
            outer, mode.inside = mode.inside, _op
            try:
                return _method(*a)
            finally:
                mode.inside = outer
        monkeypatch.setattr(backend, op, wrapped)
    bind = backend.bind  # decided layers call what bind returns, not the methods

    def bound(op, args):
        call = bind(op, args)

        def marked(*tensors):
            outer, mode.inside = mode.inside, op
            try:
                return call(*tensors)
            finally:
                mode.inside = outer
        return marked
    monkeypatch.setattr(backend, "bind", bound)
    dispatch.forget_fast_paths()  # no function bound before the wrapping, none kept after
    yield mode
    dispatch.forget_fast_paths()


def _build(name, seed=0):
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(num_classes=10).train()


def _errors(model, x, call=None):
    model.zero_grad(set_to_none=True)
    out = (call if call is not None else model)(x)
    out.square().sum().backward()
    return {"output": out.detach(), **{k: p.grad for k, p in model.named_parameters()}}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_convert_resnet_fuses_residual_add_and_relu(name, blocks, watch):
    stock = _build(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast = fastconv.convert(stock, backend="torch")
    report = fastconv.conversion_report(fast)
    assert report.method.startswith("torch.fx graph") and "forward() rewritten" in report.method
    assert report.relus_left == [], report.relus_left
    fused = [n for n, what in report.replaced if "residual add" in what]
    assert len(fused) == blocks
    assert all(fast.get_submodule(n).relu for n in fused)
    with watch:  # the detector sees stock's ReLUs and residual adds
        stock(x)
    assert len(watch.outside) >= 2 * blocks and watch.bn_adds == 0
    watch.outside.clear()
    with watch:
        out = fast(x)
    assert watch.outside == [], watch.outside
    assert watch.bn_adds == blocks
    # outputs and every gradient like stock's, against float64 (norms: tiny batch norms of 2
    # values per channel in the last stage amplify every rounding; see test_convert_graph.py)
    ref = copy.deepcopy(stock).double()
    got, want, exact = _errors(fast, x), _errors(stock, x), _errors(ref, x.double())
    assert torch.equal(got["output"], out.detach())
    for k, r in exact.items():
        err_stock = float((want[k].double() - r).norm())
        err_fast = float((got[k].double() - r).norm())
        assert err_fast <= 4 * err_stock + 8 * U[torch.float32] * float(r.norm()), k


def test_convert_resnet18_triton_batch_norm_matches_stock():
    # the kernels in place: every BatchNorm2d on the Triton backend (interpreter), with the
    # residual and ReLU fused; outputs and gradients like stock's
    support.require("triton")
    stock = _build("resnet18", seed=3)
    fast = fastconv.convert(stock, backend="torch")
    for m in fast.modules():
        if isinstance(m, fnn.BatchNorm2d):
            m.backend = "triton"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(stock).double()
    got, want, exact = _errors(fast, x), _errors(stock, x), _errors(ref, x.double())
    for k, r in exact.items():
        err_stock = float((want[k].double() - r).norm())
        err_fast = float((got[k].double() - r).norm())
        assert err_fast <= 4 * err_stock + 8 * U[torch.float32] * float(r.norm()), k
    for k, v in stock.state_dict().items():  # running statistics after the step
        if v.is_floating_point():
            err = float((fast.state_dict()[k].double() - ref.state_dict()[k]).norm())
            assert err <= 4 * float((v.double() - ref.state_dict()[k]).norm()) \
                + 8 * U[torch.float32] * float(v.norm()), k


def test_convert_resnet18_state_dict_and_revert_round_trips():
    stock = _build("resnet18")
    fast = fastconv.convert(stock, backend="torch")
    assert list(fast.state_dict()) == list(stock.state_dict())
    other = _build("resnet18", seed=99)
    fast.load_state_dict(other.state_dict(), strict=True)  # stock checkpoint -> converted
    back = _build("resnet18", seed=5)
    back.load_state_dict(fast.state_dict(), strict=True)   # converted -> stock
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    reverted = fastconv.revert(fast)
    assert "forward" not in reverted.__dict__
    assert [type(m) for m in reverted.modules()] == [type(m) for m in other.modules()]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reverted.eval()(x), other.eval()(x))
        assert torch.equal(fast.eval()(x), other.eval()(x))


class Forms(nn.Module):
    """Every way of writing the residual add and the ReLU after it, and cases that stay."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(7))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(7))
        self.down = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        c, b = self.convs, self.bns
        y = self.relu(b[0](c[0](x)) + x)                 # out + identity, shared module
        z = b[1](c[1](y))
        z += self.down(y)                                # in place; identity made after the bn
        y = F.relu(z, inplace=True)
        y = torch.relu(torch.add(b[2](c[2](y)), y))      # torch.add, torch.relu
        y = b[3](c[3](y)).add(y).relu_()                 # .add(), .relu_()
        y = torch.relu_(y + b[4](c[4](y)))               # bn on the right
        t = b[5](c[5](y))
        w = self.relu(t + y) + t                         # the bn output has another user: stays
        return self.relu(b[6](c[6](w)).add(w, alpha=2))  # alpha: stays


def test_convert_every_residual_form():
    torch.manual_seed(0)
    stock = Forms().train()
    fast = fastconv.convert(stock, backend="torch")
    report = fastconv.conversion_report(fast)
    fused = [n for n, what in report.replaced if "residual add" in what]
    assert fused == [f"bns.{i}" for i in range(5)]
    assert [fast.bns[i].relu for i in range(7)] == [True] * 5 + [False] * 2
    assert len(report.relus_left) == 2
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for mode in ("train", "eval"):
        getattr(stock, mode)()
        getattr(fast, mode)()
        xs, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ys, yf = stock(xs), fast(xf)
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-5)
        (gs,), (gf,) = torch.autograd.grad(ys.sum(), [xs]), torch.autograd.grad(yf.sum(), [xf])
        torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-5)
    for k, v in stock.state_dict().items():  # running statistics alike after the two calls
        torch.testing.assert_close(fast.state_dict()[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_convert_resnet18_compiles_fullgraph():
    # the rewritten forward with bn(y, residual=identity) traces as one graph; compiled output
    # and gradients like eager's, against float64
    stock = _build("resnet18", seed=6)
    fast = fastconv.convert(stock, backend="torch")
    ref = copy.deepcopy(stock).double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    got, want, exact = _errors(fast, x, compiled), _errors(stock, x), _errors(ref, x.double())
    for k, r in exact.items():
        err_stock = float((want[k].double() - r).norm())
        err_fast = float((got[k].double() - r).norm())
        assert err_fast <= 4 * err_stock + 8 * U[torch.float32] * float(r.norm()), k
