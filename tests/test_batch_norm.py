"""batch_norm (+ fused ReLU) on every kernel backend and device against float64: output, every
gradient and the running statistics, elementwise within bounds that carry the statistics'
error (tests/support.py). Varied: eps 1e-5 / 1e-3 / 0.1, channels of tiny and large variance,
means far from zero, two values per channel, momentum 0.1 / 0.5 / None, affine on/off (and
weight or bias alone), running statistics present/absent, training/eval, relu, both memory
formats, planes of 64 elements and more (tile boundaries), float16/float64 where served.
"""
import pytest
import torch

import fastconv
import support
from support import assert_layout, assert_within

pytestmark = pytest.mark.usefixtures("small_tiles")


def make(shape, dtype, device, *, spread=None, offset=0.0, affine=True, stats=True,
         channels_last=False, seed=()):
    """Input with a different mean and spread per channel (``spread``: per-channel standard
    deviations, cycled), float32 parameters and statistics (the input's dtype for float64)."""
    gen = support.generator("bn", shape, dtype, spread, offset, affine, stats, channels_last,
                            *seed)
    c = shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(c, generator=gen, dtype=torch.float64) * 2 + offset
    if spread is None:
        sd = torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.25
    else:
        sd = torch.tensor([spread[i % len(spread)] for i in range(c)], dtype=torch.float64)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * sd.view(1, -1, 1, 1)
         + mean.view(1, -1, 1, 1)).to(dtype).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = lambda t: t.to(pdt).to(device)  # noqa: E731
    args = dict(input=x, running_mean=None, running_var=None, weight=None, bias=None)
    if affine:
        args["weight"] = p(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1)
        args["bias"] = p(torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
    if stats:
        args["running_mean"] = p(torch.randn(c, generator=gen, dtype=torch.float64) * 0.1)
        args["running_var"] = p(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    return args, gen


def check(backend, args, gen, *, training, momentum=0.1, eps=1e-5, relu=False, what=""):
    """One call with gradients: everything against float64 within its bound."""
    a = dict(args, training=training, momentum=momentum, eps=eps, relu=relu)
    x = args["input"]
    g = support.grad_for(x.shape, gen, x.dtype, x.device)
    try:
        out, _, grads, used = support.run("batch_norm", a, backend, g)
    except fastconv.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert out.dtype == x.dtype
    assert_layout(out, x, f"{what} output")
    ref = support.bn_reference(x, args["weight"], args["bias"], args["running_mean"],
                               args["running_var"], training, momentum, eps, relu, out, g)
    assert_within(out, *ref["output"], f"{what} output")
    assert_layout(grads["input"], x, f"{what} grad_input")
    for name, got in grads.items():
        assert got.dtype == args[name].dtype, f"{what} grad {name} dtype"
        assert_within(got, *ref[name], f"{what} grad {name}")
    if args["running_mean"] is not None:
        for name in ("running_mean", "running_var"):
            if name in ref:
                assert_within(used[name], *ref[name], f"{what} {name}")
            else:  # eval never touches the statistics
                assert torch.equal(used[name], args[name]), f"{what}: eval changed {name}"
    return out


# (id, shape, make() options, check() options). Planes of >= 64 elements in the first rows.
TINY_LARGE = (1e-3, 1.0, 30.0)  # per-channel standard deviations
CASES = [
    ("8x8 planes", (2, 3, 8, 8), {}, dict(training=True)),
    ("8x8 planes nhwc relu eps1e-3 mom0.5", (2, 5, 8, 8), dict(channels_last=True),
     dict(training=True, relu=True, eps=1e-3, momentum=0.5)),
    ("9x9 eval relu eps0.1", (2, 3, 9, 9), {}, dict(training=False, relu=True, eps=0.1)),
    ("tiny+large variance eps0.1", (2, 3, 6, 5), dict(spread=TINY_LARGE),
     dict(training=True, eps=0.1)),
    ("tiny+large variance eps1e-3 relu", (3, 6, 4, 5), dict(spread=TINY_LARGE),
     dict(training=True, relu=True, eps=1e-3)),
    ("tiny+large variance eps1e-5 nhwc", (3, 3, 5, 5), dict(spread=TINY_LARGE, channels_last=True),
     dict(training=True)),
    ("tiny+large variance eval eps1e-3", (2, 3, 8, 8), dict(spread=TINY_LARGE),
     dict(training=False, eps=1e-3)),
    ("two values per channel", (2, 4, 1, 1), {}, dict(training=True, relu=True)),
    ("two values per channel eps0.1", (1, 3, 2, 1), {}, dict(training=True, eps=0.1)),
    # (plain float32 training at mean 1e4: test_large_mean)
    ("mean 1e4 nhwc relu no affine", (2, 4, 5, 7),
     dict(offset=1e4, spread=(1.0,), channels_last=True, affine=False),
     dict(training=True, relu=True)),
    ("mean 1e4 eval", (2, 3, 4, 4), dict(offset=1e4), dict(training=False, relu=True)),
    ("odd no affine no stats", (3, 5, 7, 5), dict(affine=False, stats=False),
     dict(training=True, eps=0.1)),
    ("odd nhwc no stats relu", (3, 5, 3, 7), dict(stats=False, channels_last=True),
     dict(training=True, relu=True, eps=1e-3)),
    ("eval nhwc eps1e-3", (3, 5, 3, 4), dict(channels_last=True), dict(training=False, eps=1e-3)),
    ("1x1 pixels", (6, 5, 1, 1), {}, dict(training=True, momentum=0.5, eps=1e-3)),
]


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_batch_norm(case, bd):
    name, shape, mk, ck = case
    backend, device = bd
    support.require(backend, device)
    args, gen = make(shape, torch.float32, device, **mk)
    check(backend, args, gen, what=f"{backend} {name}", **ck)


@pytest.mark.parametrize("bd", support.backend_params(support.BACKENDS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shift", [1e3, 1e4, 1e5])
def test_large_mean(shift, training, bd):
    """x = shift + N(0, 1) in float32 (from test_reliability_numerics). A float32 mean carries
    an absolute error of up to u |mean|; bn_reference's bounds carry that through the
    normalisation elementwise, which a one-pass E[x^2] - E[x]^2 variance or a plain running
    sum for the mean misses by orders of magnitude. Eval reads running statistics near the
    data, as after training on it."""
    backend, device = bd
    support.require(backend, device)
    args, gen = make((4, 3, 6, 5), torch.float32, device, offset=shift, spread=(1.0,),
                     affine=True, stats=True)
    if not training:
        args["running_mean"] = torch.full((3,), shift, device=device) + 0.1
        args["running_var"] = torch.full((3,), 1.2, device=device)
    check(backend, args, gen, training=training, what=f"{backend} mean {shift:g}")


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_weight_or_bias_alone(which, bd):
    backend, device = bd
    support.require(backend, device)
    args, gen = make((3, 4, 5, 6), torch.float32, device)
    args[{"weight": "bias", "bias": "weight"}[which]] = None
    check(backend, args, gen, training=True, relu=which == "bias", eps=1e-3, what=which)


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes(dtype, bd):
    # float16 input with float32 parameters (autocast's case); float64 throughout
    backend, device = bd
    support.require(backend, device)
    for training in (True, False):
        args, gen = make((2, 3, 8, 8), dtype, device, seed=(training,))
        check(backend, args, gen, training=training, relu=True, eps=1e-3,
              what=f"{dtype} training={training}")


@pytest.mark.parametrize("bd", support.backend_params())
def test_strided_input_and_gradient(bd):
    backend, device = bd
    support.require(backend, device)
    args, gen = make((3, 8, 5, 6), torch.float32, device)
    args = {k: v[::2] if k != "input" and v is not None else v for k, v in args.items()}
    args["input"] = args["input"][:, ::2]  # neither NCHW- nor NHWC-contiguous
    check(backend, args, gen, training=True, relu=True, what="strided")


@pytest.mark.parametrize("bd", support.backend_params())
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
def test_module_running_stats_over_steps(momentum, bd):
    """fastconv.nn.BatchNorm2d over three steps (momentum None: the cumulative average) against
    float64 steps, then eval on the running statistics."""
    backend, device = bd
    support.require(backend, device)
    c = 4
    mod = fastconv.nn.BatchNorm2d(c, momentum=momentum, relu=True, backend=backend).to(device)
    with torch.no_grad():
        mod.weight.copy_(torch.linspace(0.5, 1.5, c))
        mod.bias.copy_(torch.linspace(-0.3, 0.3, c))
    rm, rv = mod.running_mean.double(), mod.running_var.double()
    brm = brv = torch.zeros(c, dtype=torch.float64, device=device)
    for step in range(3):
        args, _ = make((2, c, 4, 5), torch.float32, device, stats=False, seed=(step,))
        x = args["input"]
        y = mod(x)
        f = 1 / (step + 1) if momentum is None else momentum
        ref = support.bn_reference(x, mod.weight, mod.bias, rm.float(), rv.float(), True, f,
                                   1e-5, True, y, None)
        assert_within(y, *ref["output"], f"step {step} output")
        (rm, drm), (rv, drv) = ref["running_mean"], ref["running_var"]
        brm, brv = (1 - f) * brm + drm, (1 - f) * brv + drv
        assert_within(mod.running_mean, rm, brm, f"step {step} running_mean")
        assert_within(mod.running_var, rv, brv, f"step {step} running_var")
        rm, rv = mod.running_mean.double(), mod.running_var.double()
    assert int(mod.num_batches_tracked) == 3
    mod.eval()
    args, _ = make((2, c, 4, 5), torch.float32, device, stats=False, seed=("eval",))
    y = mod(args["input"])
    ref = support.bn_reference(args["input"], mod.weight, mod.bias, mod.running_mean,
                               mod.running_var, False, None, 1e-5, True, y, None)
    assert_within(y, *ref["output"], "eval output")


def test_torch_backend_is_routed_and_matches_float64():
    # the reference backend: named, dispatch runs reference.py (bitwise F.batch_norm), whose
    # float32 result meets the float64 bounds
    args, gen = make((2, 3, 8, 8), torch.float32, "cpu")
    a = dict(args, training=True, momentum=0.1, eps=0.1, relu=True)
    assert fastconv.functional.backend_for("batch_norm", **a, backend="torch") == "torch"
    out, _, grads, used = support.run("batch_norm", a, "torch")
    want = torch.relu(torch.nn.functional.batch_norm(
        args["input"], args["running_mean"].clone(), args["running_var"].clone(),
        args["weight"], args["bias"], True, 0.1, 0.1))
    assert torch.equal(out, want)
    ref = support.bn_reference(args["input"], args["weight"], args["bias"],
                               args["running_mean"], args["running_var"], True, 0.1, 0.1, True,
                               out, None)
    assert_within(out, *ref["output"], "torch output")
    assert_within(used["running_var"], *ref["running_var"], "torch running_var")


# Edge shapes (moved from test_reliability_numerics.py): batch 0 (eval), 1x1 spatial, batch 1,
# very wide channels. make_case's random arguments, checked by support.check_against_reference
# (every element within its bound).
EDGE_CASES = [
    ("bn eval batch0", "batch_norm", (0, 3, 5, 5), dict(training=False, relu=True)),
    ("bn train 1x1 spatial", "batch_norm", (2, 3, 1, 1), dict(training=True)),
    ("bn train batch1", "batch_norm", (1, 3, 2, 1), dict(training=True, relu=True)),
    # (the Triton interpreter runs one program per channel in NCHW: keep that one narrower;
    # in NHWC it takes INTERPRETER_SHAPES's)
    ("bn train wide channels nhwc", "batch_norm", (2, 4096, 1, 2),
     dict(training=True, relu=True, channels_last=True)),
    ("bn train wide channels", "batch_norm", (2, 256, 1, 1), dict(training=True, relu=True)),
    ("bn train odd", "batch_norm", (3, 5, 7, 5), dict(training=True, relu=True)),
    ("bn eval odd", "batch_norm", (3, 5, 7, 5), dict(training=False)),
    ("bn train no affine no stats", "batch_norm", (2, 3, 3, 5),
     dict(training=True, affine=False, stats=False)),
]


# The Triton interpreter runs channel blocks of 64 (batch_norm_configs.json, "cpu") one after
# another, 0.4 s each at 4096 channels: 200 gives three whole blocks and a partial one (4096
# channels: 28 s of the suite, and no partial block).
INTERPRETER_SHAPES = {"bn train wide channels nhwc": (2, 200, 1, 2)}


@pytest.mark.parametrize("bd", support.backend_params(support.BACKENDS))
@pytest.mark.parametrize("case", EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_edge_shapes(case, bd):
    name, op, shape, params = case
    backend, device = bd
    support.require(backend, device)
    if backend == "triton" and device == "cpu":
        shape = INTERPRETER_SHAPES.get(name, shape)
    args = support.make_case(op, shape, device=device, **dict(params))
    if backend == "triton" and shape[0] == 0:
        # the Triton batch norm refuses empty inputs (auto falls back): a clear error is fine
        with pytest.raises(fastconv.BackendUnavailableError, match="non-empty"):
            support.call(op, args, backend)
        return
    support.check_against_reference(op, args, backend, what=f"{backend} {name}")
