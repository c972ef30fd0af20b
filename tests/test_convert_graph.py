"""convert() on models written the way people write them (torchvision, fastconv.models): the
traced graph loses every ReLU call that a conv or batch norm can apply (counted at the ATen
level during a training-mode forward), and the result matches stock against float64.

Each converted model's float32 output is compared with stock float32 against a float64 copy:
its error (L2 norm) may be at most ``RATIO`` times torch's own, taken as the worse of stock in
NCHW and stock in channels_last (two equally valid float32 orders), plus a few unit roundoffs
of the norm. Gradients and the state after two SGD steps are compared in float64 (the converted
model built from the float64 copy): in float32 a ReLU input or max-pool gap within rounding of
its kink lets one implementation pass a gradient where another does not (seen on an AMD EPYC in
VGG-11-BN: 70x stock's error in the first conv's weight after two steps, stock lucky), so no
fixed factor of stock's float32 error holds for gradients. The float64 bound is torch's own
float64 spread: stock float64 in channels_last, or stock float32's error (how much the problem
amplifies rounding) carried to float64's precision (see assert_like_stock). Whole networks are
compared by norm and against torch's own spread, not element by element: at these small inputs
batch norm sees 2 to 8 values per channel in the last stages, which amplifies every rounding
(measured on torchvision's ResNet-50: a layer-4 BN bias gradient 0.02% off in NCHW, 1.8% in
channels_last -- stock torch both times). The per-op tests bound every element.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastconv
from fastconv import models
from fastconv import nn as fnn
from fastconv.convert import RESIDUAL_LEFT
from test_reliability_numerics import require

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

RATIO = 4.0
U32 = 2.0 ** -24
U64 = 2.0 ** -53

def _narrow(model, width=64):
    """The model with its classifier's hidden Linear layers ``width`` wide instead of 4096
    (same layers, same ReLUs): the 100M-parameter classifier, copied in float32, channels_last
    and float64 with gradients and momentum, needs more memory than the shared machine has."""
    layers = list(model.classifier)
    linears = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    for i in linears:
        m = layers[i]
        layers[i] = nn.Linear(m.in_features if i == linears[0] else width,
                              m.out_features if i == linears[-1] else width)
    model.classifier = nn.Sequential(*layers)
    return model


# name -> (builder, input shape of one example); small inputs keep CPU time low
MODELS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64)),
    "tv_googlenet": (lambda: torchvision.models.googlenet(
        num_classes=10, aux_logits=False, init_weights=True), (3, 64, 64)),
    "tv_vgg11_bn": (lambda: _narrow(torchvision.models.vgg11_bn(num_classes=10)), (3, 64, 64)),
    "tv_alexnet": (lambda: _narrow(torchvision.models.alexnet(num_classes=10)), (3, 64, 64)),
    "alexnet": (lambda: models.alexnet(image_size=67), (1, 67, 67)),
    "vgg11": (lambda: models.vgg11(narrow=True, image_size=32), (1, 32, 32)),
    "vgg16_bn": (models.vgg16_bn, (3, 32, 32)),
    "nin": (models.nin, (1, 67, 67)),
    "googlenet": (models.googlenet, (1, 32, 32)),
    "lenet": (models.lenet, (1, 28, 28)),
    "lenet_bn": (models.lenet_bn, (1, 28, 28)),
    # 64x64: at 32x32 the last stage is 1x1, batch norm sees two values per channel, and the
    # gradient of the conv bias before it (zero in exact arithmetic) is rounding noise only
    "resnet18": (models.resnet18, (1, 64, 64)),
}
SEEDS = {name: i for i, name in enumerate(MODELS)}

_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default,
             torch.ops.aten.threshold.default, torch.ops.aten.threshold_.default}


class CountReLUs(TorchDispatchMode):
    """Counts ATen ReLU calls by what made their input: a Linear ('linear': addmm), an add
    ('add': a residual) or anything else ('other')."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RELU_OPS:
            self.counts[getattr(args[0], "_made_by", "other")] += 1
        elif isinstance(out, torch.Tensor):
            made = {"addmm": "linear", "add": "add", "add_": "add"}.get(
                func.overloadpacket.__name__)
            if made:
                out._made_by = made
        return out


def relu_counts(model, x) -> dict:
    with CountReLUs() as c:
        model(x)
    return dict(c.counts)


def build(name, seed=None):
    fn, shape = MODELS[name]
    torch.manual_seed(SEEDS[name] if seed is None else seed)
    model = fn().train()
    for m in model.modules():  # same function in float32 and float64: no dropout masks
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, *shape)
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_relu_pass_left_but_linear_and_residual(name):
    """The extension's kernels apply ReLU inside the op (the torch backend composes torch's
    own relu, so ATen counts say nothing there)."""
    require("extension")
    stock, x = build(name)
    fast = fastconv.convert(stock, backend="extension")
    before, after = relu_counts(stock, x), relu_counts(fast, x)
    report = fastconv.conversion_report(fast)
    assert report.method.startswith("torch.fx graph")
    assert after.get("other", 0) == 0, (before, after, report.relus_left)
    # the ReLUs left are exactly those the report lists, with their reasons; a residual add
    # after a batch norm is fused into it with its ReLU (batch_norm's residual)
    residual = sum(why == RESIDUAL_LEFT for _, why in report.relus_left)
    assert after.get("add", 0) == residual
    assert after.get("linear", 0) == before.get("linear", 0)
    assert len(report.relus_fused) == before.get("other", 0) + before.get("add", 0) - residual
    assert len(report.relus_left) == sum(after.values())
    print(f"{name}: ReLU passes stock {before}, converted {after}")


def _errors(model, x, call=None):
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(x)
    out.square().sum().backward()
    return {"output": out.detach(), **{k: p.grad for k, p in model.named_parameters()}}


def assert_like_stock(fast64: dict, stocks: list, cl64: dict, ref: dict, what="", noise=None):
    """fast64's distance from the float64 reference within RATIO x torch's own spread in
    float64: the larger of stock float64 channels_last's distance from it and stock float32's
    error (the worse of the two memory formats) carried to float64's precision (x 2^-29: the
    problem's amplification of rounding, measured where it is large enough to see), plus 8
    units of the tensor's norm. ``noise``: the keys whose exact value is zero, with a bound on
    their error."""
    noise = noise or {}
    for k, r in ref.items():
        if k in noise:
            # zero in exact arithmetic (a conv bias feeding training-mode batch norm: its
            # gradient, and its change over the steps): every result is rounding noise of
            # summands up to the gradients' scale; a ratio of two noises means nothing, so
            # bound the noise instead
            err = float((fast64[k] - r).norm())
            assert err <= noise[k], f"{what} {k} (zero in exact arithmetic): {err:.3e}"
            continue
        norm = float(r.norm())
        err32 = max(float((s[k].double() - r).norm()) for s in stocks)
        err64 = float((cl64[k] - r).norm())
        err_fast = float((fast64[k] - r).norm())
        bound = RATIO * max(err64, err32 * U64 / U32) + 8 * U64 * norm
        assert err_fast <= bound, (f"{what} {k}: converted (float64) error {err_fast:.3e} > "
                                   f"{RATIO} x max(stock float64 channels_last's {err64:.3e}, "
                                   f"stock float32's {err32:.3e} x 2^-29) + 8u x {norm:.3e}")


def _numerics_cases():
    for name in sorted(MODELS):
        yield pytest.param(name, "extension", id=f"{name}-extension")
        if name not in ("tv_resnet50", "tv_vgg11_bn"):  # the torch backend: the smaller ones
            yield pytest.param(name, "torch", id=f"{name}-torch")


def _train(nets, inputs, steps=2):
    """``steps`` SGD steps (momentum 0.9) of each net on its input: their float state after."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in nets]
    for _ in range(steps):
        for m, o, xx in zip(nets, opts, inputs):
            o.zero_grad(set_to_none=True)
            m(xx).square().mean().backward()
            o.step()
    return [{k: v for k, v in m.state_dict().items() if v.is_floating_point()} for m in nets]


@pytest.mark.parametrize("name,backend", list(_numerics_cases()))
def test_outputs_gradients_and_two_sgd_steps_match_stock(name, backend):
    """The float32 output of the converted model; its gradients and its state after two SGD
    steps in float64 (the module docstring says why)."""
    require(backend)
    stock, x = build(name)
    ref = copy.deepcopy(stock).double()
    cl = copy.deepcopy(stock).to(memory_format=torch.channels_last)
    fast = fastconv.convert(copy.deepcopy(stock), backend=backend)
    fast64 = fastconv.convert(copy.deepcopy(ref), backend=backend)
    xcl = x.contiguous(memory_format=torch.channels_last)
    cl64 = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    s, c, r, c64, f64 = [_errors(m, xx) for m, xx in (
        (stock, x), (cl, xcl), (ref, x.double()), (cl64, xcl.double()), (fast64, x.double()))]
    with torch.no_grad():
        out = fast(x).double()
    err_stock = max(float((o["output"].double() - r["output"]).norm()) for o in (s, c))
    assert float((out - r["output"]).norm()) <= RATIO * err_stock + 8 * U32 * float(
        r["output"].norm()), f"{name} float32 output"
    # float64 noise of summands up to the gradients' scale: 1e-5 of it in float32 (the
    # extension's model test), carried to float64; the state moves by lr (1 + 1.9) of it
    scale = max(float(g.norm()) for k, g in r.items() if k != "output")
    zero = [k for k, g in r.items() if float(g.norm()) <= 1e-9 * scale]
    floor = 1e-5 * scale * U64 / U32
    assert_like_stock(f64, [s, c], c64, r, what=f"{name} step 0",
                      noise=dict.fromkeys(zero, floor))
    # running statistics and parameters after two SGD steps
    s, c, r, c64, f64 = _train((stock, cl, ref, cl64, fast64),
                               (x, xcl, x.double(), xcl.double(), x.double()))
    assert_like_stock(f64, [s, c], c64, r, what=f"{name} after two SGD steps",
                      noise=dict.fromkeys(zero, 0.01 * 2.9 * floor))


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_googlenet", "resnet18", "googlenet"])
def test_state_dict_and_revert_round_trips(name):
    stock, x = build(name)
    fast = fastconv.convert(stock, backend="torch")
    assert type(fast) is type(stock)
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in stock.named_modules()]
    other, _ = build(name, seed=99)
    fast.load_state_dict(other.state_dict(), strict=True)   # stock checkpoint -> converted
    back = copy.deepcopy(stock)
    back.load_state_dict(fast.state_dict(), strict=True)    # converted -> stock
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    reverted = fastconv.revert(fast)
    assert "forward" not in reverted.__dict__
    assert [type(m) for m in reverted.modules()] == [type(m) for m in other.modules()]
    assert [getattr(m, "inplace", None) for m in reverted.modules()] == \
        [getattr(m, "inplace", None) for m in other.modules()]
    assert relu_counts(reverted, x) == relu_counts(other, x)
    with torch.no_grad():
        assert torch.equal(reverted.eval()(x), other.eval()(x))


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_googlenet"])
def test_whole_model_save_and_load_keeps_the_rewritten_forward(name, tmp_path):
    """torch.save of the whole converted model (not only its state_dict): the loaded model
    runs the rewritten forward() (its class's forward() has no ReLU where convert took them
    out), and so does a deep copy."""
    stock, x = build(name)
    fast = fastconv.convert(stock, backend="torch").eval()
    assert "forward() rewritten" in fastconv.conversion_report(fast).method
    with torch.no_grad():
        expected = stock.eval()(x)
        torch.save(fast, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        # the torch backend runs stock's own ops in stock's order: equal, bit for bit
        assert torch.equal(fast(x), expected)
        for other in (loaded, copy.deepcopy(fast)):
            assert other.forward.__self__ is other
            assert torch.equal(other(x), expected)
        assert "forward" not in fastconv.revert(loaded).__dict__


def test_torch_compile_fullgraph_converted_resnet18():
    require("extension")
    stock, x = build("tv_resnet18")
    fast = fastconv.convert(stock, backend="extension")
    eager = _errors(fast, x)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    got = _errors(fast, x, call=compiled)
    for k in eager:  # the same kernels in the same order
        assert torch.equal(got[k], eager[k]), k


class AllForms(nn.Module):
    """Every way of writing ReLU after a conv or BN, and the cases that must stay."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(8))
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)   # shared: after c[0] and after the add

    def forward(self, x):
        y = self.relu(self.c[0](x))
        y = F.relu(self.c[1](y), inplace=True)
        y = torch.relu(self.c[2](y))
        y = torch.relu_(self.bn(self.c[3](y)))
        y = self.c[4](y).relu()
        y = self.c[5](y).relu_()
        z = self.c[6](y)
        w = F.relu(z) + z                   # z has another user: its ReLU stays
        return self.relu(self.c[7](w) + y)  # residual: stays


def test_every_relu_form_and_what_stays():
    require("extension")
    torch.manual_seed(5)
    stock = AllForms().train()
    fast = fastconv.convert(stock, backend="extension")
    report = fastconv.conversion_report(fast)
    assert report.method == "torch.fx graph, forward() rewritten"
    assert [into for _, into in report.relus_fused] == ["c.0", "c.1", "c.2", "bn", "c.4", "c.5"]
    assert [c.relu for c in fast.c] == [True] * 3 + [False] + [True] * 2 + [False] * 2
    assert fast.bn.relu and type(fast.relu) is nn.ReLU
    left = dict(report.relus_left)
    assert left == {"F.relu in the model.forward (relu_4)": "the output of c.6 has other users",
                    "relu (call 2 of 2)": RESIDUAL_LEFT}
    graph = fast.forward._fastconv_graph
    relus = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
             and ("relu" in str(n.target))]
    assert len(relus) == 2
    x = torch.randn(2, 4, 6, 6)
    ref = copy.deepcopy(stock).double()
    cl = copy.deepcopy(stock).to(memory_format=torch.channels_last)
    cl64 = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    fast64 = fastconv.convert(copy.deepcopy(ref), backend="extension")
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert_like_stock(_errors(fast64, x.double()), [_errors(stock, x), _errors(cl, xcl)],
                      _errors(cl64, xcl.double()), _errors(ref, x.double()))
    assert relu_counts(fast, x) == {"other": 1, "add": 1}


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return F.dropout(y, 0.5, training=self.training)


def test_forward_that_depends_on_the_mode_is_not_rewritten():
    fast = fastconv.convert(ModeDependent(), backend="torch")
    report = fastconv.conversion_report(fast)
    assert "forward" not in fast.__dict__ and not fast.conv.relu
    assert "differs between train and eval" in report.relus_left[0][1]


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_googlenet"])
def test_fold_bn_conv_carries_the_relu(name):
    """Training: the conv before a BN runs without ReLU and the BN applies it; after
    convert(model.eval(), fold_bn=True) the folded conv applies it."""
    require("extension")
    stock, x = build(name)
    trained = fastconv.convert(stock, backend="extension")
    convs = {n: m for n, m in trained.named_modules() if isinstance(m, fnn.Conv2dReLU)}
    assert not any(c.relu for c in convs.values())
    with torch.no_grad():  # non-trivial running statistics
        stock(x)
    stock.eval()
    folded = fastconv.convert(stock, fold_bn=True, backend="extension")
    report = fastconv.conversion_report(folded)
    bns = [n for n, m in stock.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(isinstance(folded.get_submodule(n), fnn.FoldedBatchNorm) for n in bns)
    carriers = {into for _, into in report.relus_fused}
    assert carriers and all(isinstance(folded.get_submodule(c), (fnn.Conv2dReLU, fnn.MaxPool2d))
                            for c in carriers)
    assert all(folded.get_submodule(c).relu for c in carriers)
    assert sum(isinstance(m, fnn.Conv2dReLU) and m.relu for m in folded.modules()) == \
        sum(isinstance(folded.get_submodule(c), fnn.Conv2dReLU) for c in carriers)
    assert relu_counts(folded, x).get("other", 0) == 0
    ref = copy.deepcopy(stock).double()
    with torch.no_grad():
        out, want, own = folded(x).double(), ref(x.double()), stock(x).double()
    err, err_stock = float((out - want).norm()), float((own - want).norm())
    # the folded weights and biases are rounded to float32 once more than stock's
    assert err <= RATIO * err_stock + 16 * U32 * float(want.norm()), (err, err_stock)
