"""Every malformed call, on every backend, raises a clear error and changes no state.

Extends tests/test_bad_input.py (the public layer's basic table, default backend) to:

* every op and every backend that can run here (``torch``, ``extension``, ``triton``), so a
  backend never sees, let alone half-runs, a call the public layer should have refused;
* the cases that table leaves out: rank of every tensor argument, negative strides, padding
  beyond half the kernel per axis, dilated kernels larger than the padded input, dtype and
  device mismatches between input, weight, bias and each running statistic, bool/integer/
  complex tensors, statistics of the wrong length or rank, statistics that require grad in
  training, non-numeric scalars;
* the state around the call: running_mean, running_var, num_batches_tracked (module calls),
  the Triton autotune cache (memory and file) and the launch-plan cache are unchanged;
* calls a backend cannot serve: an explicit backend raises BackendUnavailableError with its
  reason, still before any state changes;
* the registered custom ops called directly (``torch.ops.fastconv.*``), which skip the
  public layer: the extension's check their arguments in C++; the Triton ones must too.

Errors must name the argument (and shapes where shapes are the problem): each case gives the
exception type and a regex the message must match.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastconv
import fastconv.functional as FF
from fastconv import dispatch
from fastconv import nn as fnn
from support import BACKENDS, DEV, require

ROOT = Path(__file__).resolve().parents[1]


def t(*shape, dtype=torch.float32, device=None):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    out = torch.randn(*shape, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        out = out.to(dtype)
    elif not dtype.is_floating_point:
        out = (out * 3).to(dtype)
    else:
        out = out.to(dtype)
    return out.to(device or DEV)


def ones(n, dtype=torch.float32):
    return torch.ones(n, dtype=dtype, device=DEV)


META = torch.device("meta")

# (id, op, args builder -> kwargs, exception, message regex)
CONV = "conv2d_relu"
CONV_CASES = [
    ("5D input", lambda: dict(input=t(1, 1, 3, 6, 6), weight=t(4, 3, 3, 3)), ValueError,
     r"expected input to be 4D .*got 5D with shape \(1, 1, 3, 6, 6\)"),
    ("3D weight", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 9)), ValueError,
     r"expected weight to be 4D .*got 3D with shape \(4, 3, 9\)"),
    ("2D bias", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3), bias=t(4, 1)),
     ValueError, r"bias must have shape \(4,\).*got \(4, 1\)"),
    ("channels vs groups", lambda: dict(input=t(1, 6, 6, 6), weight=t(4, 2, 3, 3), groups=2),
     ValueError, r"input has 6 channels but weight \(4, 2, 3, 3\) with groups=2 expects 4"),
    ("groups as float", lambda: dict(input=t(1, 4, 6, 6), weight=t(4, 2, 3, 3), groups=2.0),
     ValueError, r"groups must be a positive int, got 2\.0"),
    ("negative stride", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3), stride=(1, -1)),
     ValueError, r"stride must be positive"),
    ("stride of three", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3),
                                     stride=(1, 1, 1)),
     TypeError, r"stride must be an int or a pair"),
    ("bool stride", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3), stride=True),
     TypeError, r"stride must be an int or a pair"),
    ("dilated kernel larger than padded input",
     lambda: dict(input=t(1, 3, 5, 9), weight=t(4, 3, 3, 3), dilation=3, padding=(0, 1)),
     ValueError, r"kernel \(3, 3\) \(dilation \(3, 3\)\) is larger than the padded input height 5"),
    ("kernel larger in width only", lambda: dict(input=t(1, 3, 9, 2), weight=t(4, 3, 1, 5)),
     ValueError, r"larger than the padded input width 2"),
    ("half weight, float input", lambda: dict(input=t(1, 3, 6, 6),
                                               weight=t(4, 3, 3, 3, dtype=torch.float16)),
     TypeError, r"input is torch.float32 but weight is torch.float16"),
    ("double bias", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3),
                                 bias=t(4, dtype=torch.float64)),
     TypeError, r"input is torch.float32 but bias is torch.float64"),
    ("bias on another device", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3),
                                            bias=torch.empty(4, device=META)),
     RuntimeError, r"bias is on meta but input is on"),
    ("integer weight", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3, dtype=torch.int64)),
     TypeError, r"weight must be a floating-point tensor, got torch.int64"),
    ("complex input", lambda: dict(input=t(1, 3, 6, 6, dtype=torch.complex64),
                                   weight=t(4, 3, 3, 3)),
     TypeError, r"input must be a floating-point tensor, got torch.complex64"),
    ("bool input", lambda: dict(input=t(1, 3, 6, 6, dtype=torch.bool), weight=t(4, 3, 3, 3)),
     TypeError, r"input must be a floating-point tensor, got torch.bool"),
    ("integer bias", lambda: dict(input=t(1, 3, 6, 6), weight=t(4, 3, 3, 3),
                                  bias=t(4, dtype=torch.int32)),
     TypeError, r"bias must be a floating-point tensor"),
    ("weight not a tensor", lambda: dict(input=t(1, 3, 6, 6), weight=[[1.0]]), TypeError,
     r"weight must be a torch.Tensor"),
]

POOL_CASES = []
for _op in ("max_pool2d", "avg_pool2d"):
    POOL_CASES += [
        (f"{_op} 2D input", _op, lambda: dict(input=t(6, 6), kernel_size=2), ValueError,
         r"expected input to be 4D .*got 2D"),
        (f"{_op} negative stride", _op, lambda: dict(input=t(1, 2, 6, 6), kernel_size=2,
                                                     stride=-2), ValueError,
         r"stride must be positive"),
        (f"{_op} zero kernel width", _op, lambda: dict(input=t(1, 2, 6, 6), kernel_size=(2, 0)),
         ValueError, r"kernel_size must be positive"),
        (f"{_op} padding over half kernel in width", _op,
         lambda: dict(input=t(1, 2, 6, 6), kernel_size=3, padding=(1, 2)), ValueError,
         r"padding \(1, 2\) must be at most half of kernel_size \(3, 3\)"),
        (f"{_op} negative padding", _op, lambda: dict(input=t(1, 2, 6, 6), kernel_size=3,
                                                      padding=-1), ValueError,
         r"padding must be non-negative"),
        (f"{_op} kernel larger than input", _op, lambda: dict(input=t(1, 2, 4, 2), kernel_size=3),
         ValueError, r"kernel_size \(3, 3\).*larger than the input \(1, 2, 4, 2\)"),
        (f"{_op} complex input", _op, lambda: dict(input=t(1, 2, 6, 6, dtype=torch.complex64),
                                                   kernel_size=2), TypeError,
         r"input must be a floating-point tensor, got torch.complex64"),
        (f"{_op} bool input", _op, lambda: dict(input=t(1, 2, 6, 6, dtype=torch.bool),
                                                kernel_size=2), TypeError,
         r"input must be a floating-point tensor, got torch.bool"),
        (f"{_op} kernel of three", _op, lambda: dict(input=t(1, 2, 6, 6), kernel_size=(2, 2, 2)),
         TypeError, r"kernel_size must be an int or a pair"),
    ]
POOL_CASES += [
    ("max_pool2d dilated kernel larger than padded input", "max_pool2d",
     lambda: dict(input=t(1, 2, 5, 5), kernel_size=3, dilation=3), ValueError,
     r"kernel_size \(3, 3\) \(dilation \(3, 3\), padding \(0, 0\)\) is larger than the input"),
    ("max_pool2d zero dilation", "max_pool2d",
     lambda: dict(input=t(1, 2, 5, 5), kernel_size=3, dilation=(0, 1)), ValueError,
     r"dilation must be positive"),
    ("avg_pool2d float divisor", "avg_pool2d",
     lambda: dict(input=t(1, 2, 6, 6), kernel_size=2, divisor_override=2.5), ValueError,
     r"divisor_override must be a non-zero int or None, got 2\.5"),
    ("adaptive 2D input", "adaptive_avg_pool2d", lambda: dict(input=t(6, 6), output_size=2),
     ValueError, r"expected input to be 4D"),
    ("adaptive negative size", "adaptive_avg_pool2d",
     lambda: dict(input=t(1, 2, 6, 6), output_size=(2, -1)), ValueError,
     r"output_size must be positive"),
    ("adaptive size of three", "adaptive_avg_pool2d",
     lambda: dict(input=t(1, 2, 6, 6), output_size=(1, 2, 3)), TypeError, r"output_size"),
    ("adaptive integer input", "adaptive_avg_pool2d",
     lambda: dict(input=t(1, 2, 6, 6, dtype=torch.int16), output_size=2), TypeError,
     r"input must be a floating-point tensor, got torch.int16"),
]

BN = "batch_norm"


def bn(input=None, training=True, **over):
    """Valid batch-norm arguments for 4 channels, with ``over`` replacing some."""
    args = dict(input=t(2, 4, 3, 3) if input is None else input,
                running_mean=t(4) * 0.1, running_var=t(4).abs() + 0.5, weight=t(4), bias=t(4),
                training=training)
    args.update(over)
    return args


BN_CASES = [
    ("5D input", lambda: bn(t(2, 4, 3, 3, 1)), ValueError, r"expected input to be 4D"),
    ("running_var too long", lambda: bn(running_var=ones(5)), ValueError,
     r"running_var must have shape \(4,\) \(num_features = input channels\), got \(5,\)"),
    ("running_mean 2D", lambda: bn(running_mean=torch.zeros(1, 4, device=DEV)), ValueError,
     r"running_mean must have shape \(4,\).*got \(1, 4\)"),
    ("bias too short (eval)", lambda: bn(bias=ones(3), training=False), ValueError,
     r"bias must have shape \(4,\)"),
    ("double weight, float input", lambda: bn(weight=ones(4, torch.float64)), TypeError,
     r"weight is torch.float64 but input is torch.float32"),
    ("half input, double running_mean",
     lambda: bn(t(2, 4, 3, 3, dtype=torch.float16), running_mean=ones(4, torch.float64)),
     TypeError, r"running_mean is torch.float64 but input is torch.float16"),
    ("integer running_var", lambda: bn(running_var=torch.ones(4, dtype=torch.int64, device=DEV)),
     TypeError, r"running_var must be a floating-point tensor, got torch.int64"),
    ("complex running_mean", lambda: bn(running_mean=ones(4, torch.complex64)), TypeError,
     r"running_mean must be a floating-point tensor, got torch.complex64"),
    ("complex input", lambda: bn(t(2, 4, 3, 3, dtype=torch.complex64)), TypeError,
     r"input must be a floating-point tensor, got torch.complex64"),
    ("weight on another device", lambda: bn(weight=torch.empty(4, device=META)), RuntimeError,
     r"weight is on meta but input is on"),
    ("running_mean on another device", lambda: bn(running_mean=torch.empty(4, device=META)),
     RuntimeError, r"running_mean is on meta but input is on"),
    ("running_var requires grad in training",
     lambda: bn(running_var=(t(4).abs() + 0.5).requires_grad_()), RuntimeError,
     r"running_var requires grad but is updated in place"),
    ("running_mean requires grad, no affine",
     lambda: bn(running_mean=t(4).requires_grad_(), weight=None, bias=None), RuntimeError,
     r"running_mean requires grad but is updated in place"),
    ("momentum as a string", lambda: bn(momentum="0.1"), TypeError, r"momentum must be a float"),
    ("negative eps", lambda: bn(eps=-1e-5), ValueError, r"eps must be a positive float"),
    ("one value per channel", lambda: bn(t(1, 4, 1, 1)), ValueError,
     r"expected more than 1 value per channel when training, got input of shape \(1, 4, 1, 1\)"),
    ("weight not a tensor", lambda: bn(weight=[1.0] * 4), TypeError,
     r"weight must be a torch.Tensor or None"),
]

ALL_CASES = ([(c[0], CONV, c[1], c[2], c[3]) for c in CONV_CASES] + POOL_CASES
             + [("bn " + c[0], BN, c[1], c[2], c[3]) for c in BN_CASES])


# --------------------------------------------------------------------------- state snapshot
def _triton_state():
    if dispatch.availability()["triton"] is not None:
        return None
    from fastconv.backends.triton import conv2d_relu as conv
    table = conv._TABLE
    path = table._path
    file_bytes = path.read_bytes() if path is not None and path.exists() else None
    return dict(mem=dict(table._mem), file=file_bytes, plans=len(conv._PLANS))


def snapshot(args: dict) -> dict:
    tensors = {k: v.detach().clone() for k, v in args.items()
               if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    return dict(tensors=tensors, triton=_triton_state())


def assert_unchanged(args: dict, snap: dict) -> None:
    for name, before in snap["tensors"].items():
        after = args[name].detach()
        assert torch.equal(after.cpu(), before.cpu()) or (
            before.is_floating_point() and torch.equal(torch.isnan(after), torch.isnan(before))
            and torch.equal(after[~torch.isnan(after)], before[~torch.isnan(before)])), (
            f"{name} changed by a call that raised")
    assert _triton_state() == snap["triton"], "the Triton autotune/plan cache changed"


# Once per case, not once per backend name: fastconv.functional validates before it dispatches,
# so every backend name runs this same code (test_dispatch.py covers the dispatch itself).
@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_malformed_call_raises_clear_error_and_changes_nothing(case):
    name, op, build, exc, msg = case
    backend = None
    args = build()
    snap = snapshot(args)
    with pytest.raises(exc, match=msg):
        getattr(FF, op)(**args, backend=backend)
    assert_unchanged(args, snap)
    # explain() validates the same way (it never runs a kernel)
    with pytest.raises(exc, match=msg):
        fastconv.explain(op, **args, backend=backend)
    assert_unchanged(args, snap)


# --------------------------------------------------------------------------- modules
MODULE_CASES = [
    ("Conv2dReLU wrong channels", lambda: fnn.Conv2dReLU(3, 4, 3, padding=1),
     lambda: t(1, 5, 6, 6), ValueError, r"input has 5 channels but weight \(4, 3, 3, 3\)"),
    ("Conv2dReLU 5D input", lambda: fnn.Conv2dReLU(3, 4, 3), lambda: t(1, 3, 6, 6, 1),
     ValueError, r"expected input to be 4D"),
    ("Conv2dReLU half input, float weight", lambda: fnn.Conv2dReLU(3, 4, 3),
     lambda: t(1, 3, 6, 6, dtype=torch.float16), TypeError,
     r"input is torch.float16 but weight is torch.float32"),
    ("MaxPool2d padding over half", lambda: fnn.MaxPool2d(2, padding=2), lambda: t(1, 3, 6, 6),
     ValueError, r"must be at most half of kernel_size"),
    ("AvgPool2d too small", lambda: fnn.AvgPool2d(5), lambda: t(1, 3, 3, 3), ValueError,
     r"larger than the input"),
    ("BatchNorm2d wrong channels", lambda: fnn.BatchNorm2d(4, relu=True),
     lambda: t(2, 5, 3, 3), ValueError, r"running_mean must have shape \(5,\).*got \(4,\)"),
    ("BatchNorm2d 2D input", lambda: fnn.BatchNorm2d(4), lambda: t(2, 4), ValueError,
     r"expected 4D input"),
    ("BatchNorm2d one value per channel", lambda: fnn.BatchNorm2d(4), lambda: t(1, 4, 1, 1),
     ValueError, r"more than 1 value per channel"),
    ("BatchNorm2d momentum None, one value", lambda: fnn.BatchNorm2d(4, momentum=None),
     lambda: t(1, 4, 1, 1), ValueError, r"more than 1 value per channel"),
    ("BatchNorm2d half module, float input", lambda: fnn.BatchNorm2d(4).half(),
     lambda: t(2, 4, 3, 3),
     TypeError, r"is torch.float16 but input is torch.float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_bad_input_keeps_state(case, backend):
    """Parameters, running statistics and num_batches_tracked survive a bad call, after the
    module has trained a step (so the statistics are not at their initial values)."""
    require(backend)
    name, make, make_input, exc, msg = case
    mod = make().to(DEV)
    mod.backend = backend
    if isinstance(mod, fnn.BatchNorm2d):
        mod(t(2, 4, 3, 3, dtype=next(mod.parameters()).dtype))
        assert int(mod.num_batches_tracked) == 1
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(exc, match=msg):
        mod(make_input())
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# --------------------------------------------------------------------------- backend refusals
def _refused_cases(backend: str):
    """Calls that pass the public checks but that ``backend``'s kernels cannot serve."""
    if backend == "triton":
        d = torch.float64  # the Triton kernels accumulate in float32: float64 is refused
        return [
            ("conv2d_relu", dict(input=t(1, 2, 5, 5, dtype=d), weight=t(3, 2, 3, 3, dtype=d)),
             r"triton conv2d_relu supports float16, bfloat16 and float32, not torch.float64"),
            ("max_pool2d", dict(input=t(1, 1, 33, 33), kernel_size=33),
             r"kernel_size \(33, 33\) has 1089 taps > 1024"),
            ("avg_pool2d", dict(input=t(1, 2, 5, 5, dtype=d), kernel_size=2), r"float64"),
            ("batch_norm", bn(t(2, 4, 3, 3, dtype=d), running_mean=ones(4, d),
                              running_var=ones(4, d), weight=ones(4, d), bias=ones(4, d)),
             r"float64"),
            ("batch_norm", bn(weight=t(8)[::2]),
             r"triton batch_norm needs a contiguous .* weight"),
        ]
    return []


@pytest.mark.parametrize("backend", ["triton"])
def test_backend_refusal_is_clear_and_changes_nothing(backend):
    require(backend)
    for op, args, msg in _refused_cases(backend):
        snap = snapshot(args)
        with pytest.raises(fastconv.BackendUnavailableError,
                           match=rf"fastconv backend '{backend}' cannot run {op}: .*" + msg):
            getattr(FF, op)(**args, backend=backend)
        assert_unchanged(args, snap)
        # auto picks another backend for the same call and runs it (on this device)
        if DEV.type == "cuda" or backend != "triton":
            getattr(FF, op)(**args)


def test_batchnorm_module_refused_by_backend_keeps_counter():
    require("triton")
    mod = fnn.BatchNorm2d(4, backend="triton").double().to(DEV)
    with pytest.raises(fastconv.BackendUnavailableError, match="float64"):
        mod(t(2, 4, 3, 3, dtype=torch.float64))
    assert int(mod.num_batches_tracked) == 0, "a refused call counted a batch"


# --------------------------------------------------------------------------- direct custom ops
def test_extension_ops_check_their_arguments():
    """The extension's registered ops skip the public layer but check shapes in C++."""
    require("extension")
    ops = torch.ops.fastconv
    x = t(1, 3, 6, 6)
    rm, rv = torch.zeros(2, device=DEV), torch.ones(2, device=DEV)
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv2d_relu(x, t(4, 5, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="running_mean|running_var|channels"):
        ops.batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5, False)
    assert torch.equal(rm, torch.zeros(2, device=DEV)) and torch.equal(rv, torch.ones(2,
                                                                                      device=DEV))
    with pytest.raises(RuntimeError, match="stride"):
        ops.max_pool2d(x, [3, 3], [0, 1], [0, 0], [1, 1], False, False, False)


# Runs in a subprocess: an unchecked op may read or write out of bounds.
_DIRECT_TRITON = """
import json, os, torch
import fastconv
from fastconv.backends.triton import conv2d_relu, max_pool2d, avg_pool2d, batch_norm
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(1, 3, 6, 6, device=dev)
rm, rv = torch.zeros(2, device=dev), torch.ones(2, device=dev)
calls = {
    "conv channel mismatch": lambda: torch.ops.fastconv.triton_conv2d_relu(
        x, torch.randn(4, 5, 3, 3, device=dev), None, [1, 1], [1, 1], [1, 1], 1, True),
    "bn stats short running stats": lambda: torch.ops.fastconv.triton_batch_norm_stats(
        x, rm, rv, True, 0.1, 1e-5),
    "max_pool zero stride": lambda: torch.ops.fastconv.triton_max_pool2d(
        x, [3, 3], [0, 1], [0, 0], [1, 1], False, False, False),
}
out = {}
for name, fn in calls.items():
    try:
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        out[name] = "no error"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_triton_ops_check_their_arguments():
    require("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_DIRECT_TRITON)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the direct calls crashed the process:\n{proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, what in results.items():
        assert what.startswith(("ValueError", "RuntimeError")), f"{name}: {what}"
    assert "channels" in results["conv channel mismatch"]
    assert "running_mean" in results["bn stats short running stats"]
    assert "stride" in results["max_pool zero stride"]
