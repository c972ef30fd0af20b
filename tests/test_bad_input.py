"""Malformed calls raise a clear error naming the argument and shapes, before any state
changes (running statistics, num_batches_tracked)."""
import pytest
import torch

import fastconv.functional as FF
from fastconv import nn as fnn

x4 = lambda *s, **k: torch.randn(*s, **k)  # noqa: E731

CONV_CASES = [
    # (description, args, kwargs, exception, message fragment)
    ("2D input", (x4(3, 8), x4(4, 3, 3, 3)), {}, ValueError, "expected input to be 4D"),
    ("2D weight", (x4(1, 3, 8, 8), x4(4, 27)), {}, ValueError, "expected weight to be 4D"),
    ("channel mismatch", (x4(1, 3, 8, 8), x4(4, 2, 3, 3)), {}, ValueError,
     "input has 3 channels but weight (4, 2, 3, 3)"),
    ("groups mismatch", (x4(1, 4, 8, 8), x4(6, 4, 3, 3)), dict(groups=2), ValueError,
     "expects 8"),
    ("out not divisible by groups", (x4(1, 4, 8, 8), x4(5, 2, 3, 3)), dict(groups=2),
     ValueError, "not divisible by groups=2"),
    ("kernel larger than padded input", (x4(1, 3, 4, 4), x4(4, 3, 7, 7)), dict(padding=1),
     ValueError, "larger than the padded input height 4"),
    ("zero stride", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(stride=0), ValueError,
     "stride must be positive"),
    ("negative padding", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(padding=-1), ValueError,
     "padding must be non-negative"),
    ("zero dilation", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(dilation=(1, 0)), ValueError,
     "dilation must be positive"),
    ("bad stride type", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(stride=1.5), TypeError,
     "stride must be an int"),
    ("dtype mismatch", (x4(1, 3, 8, 8), x4(4, 3, 3, 3, dtype=torch.float64)), {}, TypeError,
     "input is torch.float32 but weight is torch.float64"),
    ("bias dtype", (x4(1, 3, 8, 8), x4(4, 3, 3, 3), x4(4, dtype=torch.float16)), {}, TypeError,
     "bias is torch.float16"),
    ("bias length", (x4(1, 3, 8, 8), x4(4, 3, 3, 3), x4(5)), {}, ValueError,
     "bias must have shape (4,)"),
    ("integer input", (torch.ones(1, 3, 8, 8, dtype=torch.int32), x4(4, 3, 3, 3)), {},
     TypeError, "input must be a floating-point tensor, got torch.int32"),
    ("complex weight", (x4(1, 3, 8, 8), torch.ones(4, 3, 3, 3, dtype=torch.complex64)), {},
     TypeError, "weight must be a floating-point tensor"),
    ("device mismatch", (x4(1, 3, 8, 8), torch.empty(4, 3, 3, 3, device="meta")), {},
     RuntimeError, "weight is on meta but input is on cpu"),
    ("not a tensor", ([1.0], x4(4, 3, 3, 3)), {}, TypeError, "input must be a torch.Tensor"),
    ("same padding with stride", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)),
     dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    ("bad padding string", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(padding="full"),
     ValueError, "padding must be an int, a pair, 'valid' or 'same'"),
    ("zero groups", (x4(1, 3, 8, 8), x4(4, 3, 3, 3)), dict(groups=0), ValueError,
     "groups must be a positive int"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_relu_bad_input(case):
    # validation precedes dispatch: the backend name does not matter
    _, args, kwargs, exc, msg = case
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        FF.conv2d_relu(*args, **kwargs)


POOL_CASES = [
    ("2D input", (x4(3, 8), 2), {}, ValueError, "expected input to be 4D"),
    ("zero kernel", (x4(1, 3, 8, 8), 0), {}, ValueError, "kernel_size must be positive"),
    ("zero stride", (x4(1, 3, 8, 8), 2), dict(stride=0), ValueError, "stride must be positive"),
    ("padding over half kernel", (x4(1, 3, 8, 8), 3), dict(padding=2), ValueError,
     "must be at most half of kernel_size"),
    ("kernel larger than input", (x4(1, 3, 2, 2), 3), {}, ValueError, "larger than the input"),
    ("bool input", (torch.ones(1, 3, 8, 8, dtype=torch.bool), 2), {}, TypeError,
     "floating-point"),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
@pytest.mark.parametrize("fn", [FF.max_pool2d, FF.avg_pool2d])
def test_pool_bad_input(case, fn):
    _, args, kwargs, exc, msg = case
    with pytest.raises(exc, match=msg):
        fn(*args, **kwargs)


def test_adaptive_pool_bad_input():
    with pytest.raises(ValueError, match="output_size must be positive"):
        FF.adaptive_avg_pool2d(x4(1, 2, 4, 4), 0)
    with pytest.raises(TypeError, match="output_size"):
        FF.adaptive_avg_pool2d(x4(1, 2, 4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="divisor_override"):
        FF.avg_pool2d(x4(1, 2, 4, 4), 2, divisor_override=0)


def bn_state():
    return dict(running_mean=torch.randn(4), running_var=torch.rand(4) + 0.5,
                weight=torch.randn(4), bias=torch.randn(4))


BN_CASES = [
    ("3D input", lambda s: ((x4(4, 5, 5), s["running_mean"], s["running_var"]), {}),
     ValueError, "expected input to be 4D"),
    ("running_mean length", lambda s: ((x4(2, 4, 3, 3), s["running_mean"][:3],
                                        s["running_var"]), dict(training=True)),
     ValueError, r"running_mean must have shape \(4,\)"),
    ("weight length", lambda s: ((x4(2, 4, 3, 3), s["running_mean"], s["running_var"],
                                  torch.randn(5)), {}), ValueError, r"weight must have shape"),
    ("stats dtype", lambda s: ((x4(2, 4, 3, 3), s["running_mean"].double(), s["running_var"]),
                               dict(training=True)), TypeError, "running_mean is torch.float64"),
    ("only running_mean", lambda s: ((x4(2, 4, 3, 3), s["running_mean"], None),
                                     dict(training=True)), ValueError, "both running_mean"),
    ("eval without stats", lambda s: ((x4(2, 4, 3, 3), None, None), {}), ValueError,
     "required when training=False"),
    ("stat requires grad", lambda s: ((x4(2, 4, 3, 3), s["running_mean"].requires_grad_(),
                                       s["running_var"]), dict(training=True)),
     RuntimeError, "running_mean requires grad"),
    ("momentum None", lambda s: ((x4(2, 4, 3, 3), s["running_mean"], s["running_var"]),
                                 dict(training=True, momentum=None)), TypeError, "momentum"),
    ("eps zero", lambda s: ((x4(2, 4, 3, 3), s["running_mean"], s["running_var"]),
                            dict(training=True, eps=0.0)), ValueError, "eps must be a positive float"),
    ("one value per channel", lambda s: ((x4(1, 4, 1, 1), s["running_mean"], s["running_var"]),
                                         dict(training=True)), ValueError,
     "more than 1 value per channel"),
    ("device", lambda s: ((x4(2, 4, 3, 3), s["running_mean"],
                           torch.empty(4, device="meta")), dict(training=True)),
     RuntimeError, "running_var is on meta"),
    ("integer", lambda s: ((torch.ones(2, 4, 3, 3, dtype=torch.int32), s["running_mean"],
                            s["running_var"]), dict(training=True)), TypeError,
     "floating-point"),
]


@pytest.mark.parametrize("case", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batch_norm_bad_input_leaves_state_alone(case):
    _, make, exc, msg = case
    state = bn_state()
    before = {k: v.detach().clone() for k, v in state.items()}
    args, kwargs = make(state)
    with pytest.raises(exc, match=msg):
        FF.batch_norm(*args, **kwargs)
    for k, v in before.items():
        assert torch.equal(state[k].detach(), v), f"{k} changed"


def test_batchnorm_module_bad_input_keeps_counter_and_stats():
    bn = fnn.BatchNorm2d(4, relu=True)
    bn(torch.randn(2, 4, 3, 3))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)|channels"):
        bn(torch.randn(2, 5, 3, 3))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
