"""The decided fast paths: a drop-in layer's memo of its last decided call (fastconv/nn.py)
and batch norm's functional fast path. A repeated call skips validation and dispatch; any
change that could change the decision or the checks' verdict takes the checked path again,
and what runs computes exactly what the checked path computes."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import dispatch, selection
from fastconv import functional as FF
from fastconv import nn as fnn

from support import assert_within, bn_reference, conv_reference, generator


def rand(*shape, seed=0, **kw):
    return torch.randn(*shape, generator=generator("fast path", seed, *shape), **kw)


LAYERS = {
    # name: (functional entry the module calls, module factory, stock twin, input shape)
    "conv": ("conv2d_relu", lambda: fnn.Conv2dReLU(3, 4, 3, padding=1, backend="torch"),
             lambda m, x: F.relu(m.to_conv()(x)), (2, 3, 6, 6)),
    "max_pool": ("max_pool2d", lambda: fnn.MaxPool2d(3, 2, 1, relu=True, backend="torch"),
                 lambda m, x: F.relu(F.max_pool2d(x, 3, 2, 1)), (2, 3, 7, 7)),
    "avg_pool": ("avg_pool2d", lambda: fnn.AvgPool2d(2, backend="torch"),
                 lambda m, x: F.avg_pool2d(x, 2), (2, 3, 6, 6)),
    "adaptive": ("adaptive_avg_pool2d", lambda: fnn.AdaptiveAvgPool2d((2, 3), backend="torch"),
                 lambda m, x: F.adaptive_avg_pool2d(x, (2, 3)), (2, 3, 6, 6)),
    "bn_eval": ("batch_norm", lambda: fnn.BatchNorm2d(3, relu=True, backend="torch").eval(),
                lambda m, x: F.relu(F.batch_norm(x, m.running_mean, m.running_var,
                                              m.weight, m.bias, False, 0.1, m.eps)),
                (2, 3, 5, 5)),
}


@pytest.fixture
def counted(monkeypatch):
    """How often each functional entry ran (the checked path: validation and dispatch)."""
    counts: dict[str, int] = {}
    # (_batch_norm: the checked path of a cumulative-average layer, which has no fast path)
    for name in {v[0] for v in LAYERS.values()} | {"_batch_norm"}:
        real = getattr(FF, name)

        def wrapper(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(FF, name, wrapper)
    return counts


def seeded_bn(m):
    if isinstance(m, fnn.BatchNorm2d):
        g = generator("fast path bn")
        m.running_mean.copy_(torch.randn(3, generator=g))
        m.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        with torch.no_grad():
            m.weight.copy_(torch.randn(3, generator=g))
            m.bias.copy_(torch.randn(3, generator=g))
    return m


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_repeated_call_skips_the_checked_path(layer, counted):
    entry, make, stock, shape = LAYERS[layer]
    m = seeded_bn(make())
    x = rand(*shape)
    first = m(x)
    assert counted[entry] == 1
    x1 = rand(*shape, seed=1)  # same signature, new values
    again = m(x1)
    assert counted[entry] == 1, "the decided call went through validation again"
    assert torch.equal(again, stock(m, x1)), "the fast path computes something else"
    assert torch.equal(m(x), first)


CHANGES = {
    "input shape": lambda m, x: (m, rand(x.shape[0] + 1, *x.shape[1:])),
    "input layout": lambda m, x: (m, x.contiguous(memory_format=torch.channels_last)
                                  if x.shape[1] > 1 else x.transpose(2, 3)),
    "input requires grad": lambda m, x: (m, x.clone().requires_grad_()),
    "dtype of layer and input": lambda m, x: (m.double(), x.double()),
    "a layer argument": None,  # per layer below
    "the fast-path table forgotten": lambda m, x: (selection.reset() or m, x),
}


def change_argument(m, x):
    if isinstance(m, fnn.Conv2dReLU):
        m.stride = (2, 2)
    elif isinstance(m, fnn.BatchNorm2d):
        m.relu = False
    elif isinstance(m, fnn.AdaptiveAvgPool2d):
        m.output_size = (3, 3)
    else:
        m.padding = 1 if isinstance(m, fnn.AvgPool2d) else 0
    return m, x


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_any_change_takes_the_checked_path_again(layer, change, counted):
    entry, make, stock, shape = LAYERS[layer]
    m = seeded_bn(make())
    x = rand(*shape)
    m(x)
    m(x)
    assert counted[entry] == 1
    m, x2 = (CHANGES[change] or change_argument)(m, x)
    if change == "a layer argument":
        expected = {"conv": lambda: F.relu(F.conv2d(x2, m.weight, m.bias, 2, 1)),
                    "max_pool": lambda: F.relu(F.max_pool2d(x2, 3, 2, 0)),
                    "avg_pool": lambda: F.avg_pool2d(x2, 2, padding=1),
                    "adaptive": lambda: F.adaptive_avg_pool2d(x2, (3, 3)),
                    "bn_eval": lambda: F.batch_norm(x2, m.running_mean, m.running_var,
                                                    m.weight, m.bias, False, 0.1, m.eps)}[layer]
    else:
        expected = lambda: stock(m, x2)  # noqa: E731
    out = m(x2)
    assert counted[entry] == 2, f"{change}: the memo served a changed call"
    assert torch.equal(out, expected())


OWN_CHANGES = {
    # the layer's own tensors: setting an attribute or Module._apply (.to(), .float(),
    # .cuda()) drops the memo whatever it changes; for fastconv's kernels their shape, dtype
    # and requires_grad are in the state too
    "a parameter frozen in place": lambda m: m.weight.requires_grad_(False),
    "a parameter replaced by one of another shape": lambda m: setattr(
        m, "weight", torch.nn.Parameter(rand(*m.weight.shape[:-1], 1, seed=7)))
    if isinstance(m, fnn.Conv2dReLU) else setattr(m, "running_var", None),
    "the layer converted in place (.float())": lambda m: m.float(),
    "a parameter replaced by one of the same shape": lambda m: setattr(
        m, "bias", torch.nn.Parameter(rand(*m.bias.shape, seed=8))),
}


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("change", sorted(OWN_CHANGES))
@pytest.mark.parametrize("layer", ["conv", "bn_eval"])
def test_a_change_of_the_layers_own_tensors_takes_the_checked_path_again(layer, change,
                                                                         backend, counted,
                                                                         request):
    """Except a torch-decided layer's parameter frozen in place: torch's own call is right
    for any tensors, so its memo holds none of the layer's (see fastconv.nn._Memo)."""
    if backend == "extension":
        request.getfixturevalue("built_extension")
    entry, make, stock, shape = LAYERS[layer]
    m = seeded_bn(make())
    m.backend = backend
    x = rand(*shape)
    m(x)
    m(x)
    assert counted[entry] == 1
    OWN_CHANGES[change](m)
    if isinstance(m, fnn.BatchNorm2d) and m.running_var is None:
        m.running_mean = None  # no running statistics: eval normalises by the batch's
        expected = F.relu(F.batch_norm(x, None, None, m.weight, m.bias, True, 0.1, m.eps))
    elif isinstance(m, fnn.Conv2dReLU):
        expected = F.relu(F.conv2d(x, m.weight, m.bias, padding=1))
    else:
        expected = stock(m, x)
    out = m(x)
    kept = backend == "torch" and change == "a parameter frozen in place"
    assert counted[entry] == (1 if kept else 2), f"{change}: the memo served a changed call"
    if backend == "torch":
        assert torch.equal(out, expected)
    elif isinstance(m, fnn.Conv2dReLU):  # the kernel: float64 reference, rounding bounds
        assert_within(out, *conv_reference(x, m.weight, m.bias, (1, 1), (1, 1), (1, 1), 1,
                                           True, out, None)["output"], change)
    else:
        assert_within(out, *bn_reference(x, m.weight, m.bias, m.running_mean, m.running_var,
                                         False, 0.1, m.eps, True, out, None)["output"], change)
    if layer == "conv" and change == "a parameter frozen in place":
        out.sum().backward()  # the frozen weight gets no gradient, the bias one
        assert m.weight.grad is None and m.bias.grad is not None


def test_grad_mode_and_the_backend_variable_are_part_of_the_state(counted, monkeypatch):
    m = fnn.Conv2dReLU(3, 4, 3)  # backend=None: $FASTCONV_BACKEND, else auto
    x = rand(2, 3, 6, 6)
    monkeypatch.setenv("FASTCONV_BACKEND", "torch")
    with torch.no_grad():
        m(x)
        m(x)
    assert counted["conv2d_relu"] == 1
    m(x)  # grad mode on: another pass
    assert counted["conv2d_relu"] == 2
    monkeypatch.setenv("FASTCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTCONV_BACKEND"):
        m(x)


def test_batch_norm_training_through_the_memo_moves_the_statistics_as_torch(counted):
    m = seeded_bn(fnn.BatchNorm2d(3, backend="torch"))
    stock = copy.deepcopy(m).to_bn()
    for step in range(4):
        x = rand(4, 3, 5, 5, seed=step)
        torch.testing.assert_close(m(x), stock(x), rtol=0, atol=0)
    assert counted["batch_norm"] == 1
    assert int(m.num_batches_tracked) == int(stock.num_batches_tracked) == 4
    assert torch.equal(m.running_mean, stock.running_mean)
    assert torch.equal(m.running_var, stock.running_var)


def test_cumulative_batch_norm_is_never_memoised(counted):
    """momentum=None: the factor 1/(n+1) changes every call, so every call is checked."""
    m = seeded_bn(fnn.BatchNorm2d(3, momentum=None, backend="torch"))
    stock = copy.deepcopy(m).to_bn()
    for step in range(3):
        x = rand(4, 3, 5, 5, seed=step)
        torch.testing.assert_close(m(x), stock(x), rtol=0, atol=0)
    assert counted["_batch_norm"] == 3
    assert torch.equal(m.running_mean, stock.running_mean)


def test_the_memo_is_neither_pickled_nor_copied():
    model = torch.nn.Sequential(fnn.Conv2dReLU(3, 4, 3, backend="torch"),
                                fnn.MaxPool2d(2, backend="torch"))
    x = rand(2, 3, 6, 6)
    model(x)
    model(x)
    assert "_fc_memo" in model[0].__dict__
    assert "_fc_memo" not in copy.deepcopy(model)[0].__dict__
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_fc_memo" not in loaded[0].__dict__
    assert torch.equal(loaded(x), model(x))
    assert "_fc_memo" not in pickle.loads(pickle.dumps(model[1])).__dict__


def test_functional_batch_norm_fast_path(monkeypatch):
    checks = []
    real = FF.check_batch_norm
    monkeypatch.setattr(FF, "check_batch_norm", lambda *a, **k: checks.append(1) or real(*a, **k))
    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = rand(3, seed=5), rand(3, seed=6)
    for step in range(3):
        x = rand(2, 3, 4, 4, seed=step)
        out = FF.batch_norm(x, rm, rv, w, b, training=True, relu=True, backend="torch")
        assert torch.equal(out, F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)))
    assert len(checks) == 1
    # an integer momentum is another key (as the checked path would see it)
    FF.batch_norm(x, rm, rv, w, b, training=True, momentum=1, backend="torch")
    assert len(checks) == 2
    # a residual is a tensor of the key: checked once, then the fast path
    for step in range(2):
        r = rand(2, 3, 4, 4, seed=10 + step)
        rm0, rv0 = rm.clone(), rv.clone()
        out = FF.batch_norm(x, rm, rv, w, b, training=True, residual=r, backend="torch")
        assert torch.equal(out, F.batch_norm(x, rm0, rv0, w, b, True) + r)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # the same update as torch's
    assert len(checks) == 3
    # ... whose layout is in the key: a channels_last residual is checked, and refused
    with pytest.raises(ValueError, match="residual is channels_last"):
        FF.batch_norm(x, rm, rv, w, b, training=True, backend="torch",
                      residual=r.contiguous(memory_format=torch.channels_last))
    assert len(checks) == 4
    with pytest.raises(ValueError, match="eps"):
        FF.batch_norm(x, rm, rv, w, b, training=True, eps=-1.0, backend="torch")


def test_decided_auto_layer_uses_the_memo(counted):
    """Under auto (here the fixed order: the suite runs with FASTCONV_AUTOTUNE=0) too."""
    m = fnn.Conv2dReLU(3, 4, 3, backend="auto")
    x = rand(2, 3, 6, 6)
    first = m(x)
    second = m(x)
    assert counted["conv2d_relu"] == 1
    assert torch.equal(first, second)
    assert fastconv.backend_for("conv2d_relu", x, m.weight, m.bias) in dispatch.NAMES


def test_batch_norm_mode_and_momentum_changes_are_followed_as_torch(counted):
    """What a BN layer derives from its attributes (training, momentum, running statistics)
    is re-derived whenever one is set: train/eval toggles and a new momentum, through the
    memo, move the statistics exactly as torch.nn.BatchNorm2d."""
    m = seeded_bn(fnn.BatchNorm2d(3, backend="torch"))
    stock = copy.deepcopy(m).to_bn()
    steps = [("train", None), ("train", None), ("eval", None), ("eval", None),
             ("train", 0.5), ("train", 0.5), ("eval", None)]
    for step, (mode, momentum) in enumerate(steps):
        for layer in (m, stock):
            layer.train(mode == "train")
            if momentum is not None:
                layer.momentum = momentum
        x = rand(4, 3, 5, 5, seed=step)
        torch.testing.assert_close(m(x), stock(x), rtol=0, atol=0)
        assert torch.equal(m.running_mean, stock.running_mean), step
        assert torch.equal(m.running_var, stock.running_var), step
    assert int(m.num_batches_tracked) == int(stock.num_batches_tracked) == 4
    assert counted["batch_norm"] == 4  # once per new mode or momentum, else the memo


def test_a_parametrized_weight_is_read_as_the_module_computes_it(counted):
    """torch.nn.utils.parametrize moves a parameter out of ``_parameters``: the layer reads
    it as an attribute then, so the parametrization's value is what the conv uses."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    m = fnn.Conv2dReLU(3, 4, 3, padding=1, backend="torch")
    parametrize.register_parametrization(m, "weight", Doubled())
    x = rand(2, 3, 6, 6)
    for _ in range(2):
        out = m(x)
        assert torch.equal(out, F.relu(F.conv2d(x, 2 * m.parametrizations.weight.original,
                                                m.bias, padding=1)))
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(-1)
    assert torch.equal(m(x), F.relu(F.conv2d(x, 2 * m.parametrizations.weight.original,
                                             m.bias, padding=1)))


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_a_residual_batch_norm_layer_uses_the_memo(counted, backend, request):
    """ResNet's block ending, ``bn(x, identity)``: decided once, then the memo, which holds
    the residual's layout; results as the checked path's."""
    if backend == "extension":
        request.getfixturevalue("built_extension")
    m = seeded_bn(fnn.BatchNorm2d(3, relu=True, backend=backend)).eval()
    x = rand(2, 3, 5, 5)
    outs = []
    for step in range(3):
        r = rand(2, 3, 5, 5, seed=20 + step)
        out = m(x, r)
        ref = F.relu(F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False,
                                  0.1, m.eps) + r)
        if backend == "torch":
            assert torch.equal(out, ref)
        else:
            ref64, bound = bn_reference(x, m.weight, m.bias, m.running_mean, m.running_var,
                                        False, 0.1, m.eps, False, out, None)["output"]
            assert_within(out, torch.relu(ref64 + r.double()), bound + 2 * 2.0**-24 * (
                ref64.abs() + r.double().abs()), f"step {step}")
        outs.append(out)
    assert counted["batch_norm"] == 1
    with pytest.raises(ValueError, match="residual is channels_last"):  # the layout: checked
        m(x, rand(2, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    assert counted["batch_norm"] == 2
    m(x)  # no residual: another state
    assert counted["batch_norm"] == 3


def test_the_key_tells_a_float_argument_from_an_int():
    """``2.0 == 2`` in a dict key: the geometry's types are in the key, so a float stride after
    a decided int one is checked (and refused, as it would be first)."""
    x, w = rand(1, 2, 6, 6), rand(3, 2, 3, 3, seed=1)
    for _ in range(2):
        FF.conv2d_relu(x, w, None, 2, backend="torch")
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints, got 2.0"):
        FF.conv2d_relu(x, w, None, 2.0, backend="torch")


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_non_tensor_after_a_decided_call_gets_the_checks_error(layer):
    entry, make, stock, shape = LAYERS[layer]
    m = seeded_bn(make())
    for _ in range(2):
        m(rand(*shape))
    with pytest.raises(TypeError, match="input"):
        m([[1.0]])
