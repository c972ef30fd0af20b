"""Argument validation for every op, shared by the public layer and the registered custom ops.

Each ``check_<op>`` takes the op's torch.nn.functional-style arguments, raises a clear error
naming the argument and the shapes (before anything is modified), and returns the normalised
arguments a backend receives (``fastconv/backends/base.py``). It depends on nothing but torch
and the shape rules (``fastconv/shapes.py``), so kernels' op registrations call it too: a direct ``torch.ops.fastconv.*`` call is checked
like a public one.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Optional

import torch

from .shapes import dense_channels_last, pool_output_size

__all__ = ["check_conv2d_relu", "check_max_pool2d", "check_avg_pool2d",
           "check_adaptive_avg_pool2d", "check_batch_norm", "CHECKS"]


def _pair(op: str, name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2)
          and all(isinstance(v, Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[-1]))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return pair


def _tensor(op: str, name: str, t: Any, ndim: int, layout: str,
            integer: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: expected {name} to be {ndim}D {layout}, got {t.dim()}D "
                         f"with shape {tuple(t.shape)}")
    if not t.is_floating_point() and not (integer and not t.is_complex()
                                          and t.dtype != torch.bool):
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def _same_device(op: str, input: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}; "
                               "move them to one device")


def _optional_vector(op: str, name: str, t: Any, size: int, what: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape ({size},) ({what}), "
                         f"got {tuple(t.shape)}")


def _autocast(input: torch.Tensor, *tensors: Optional[torch.Tensor]):
    """Cast like torch.autocast does for a convolution (a "lower precision" op)."""
    dev = input.device.type
    if not torch.is_autocast_enabled(dev):
        return (input, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t
                 for t in (input, *tensors))

def check_conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                      *, relu=True, autocast=True) -> dict[str, Any]:
    op = "conv2d_relu"
    _tensor(op, "input", input, 4, "(N, C, H, W)")
    _tensor(op, "weight", weight, 4, "(out_channels, in_channels/groups, kH, kW)")
    if not isinstance(groups, Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    stride = _pair(op, "stride", stride, 1)
    dilation = _pair(op, "dilation", dilation, 1)
    kh, kw = weight.shape[2], weight.shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1, got stride={stride}")
            totals = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
            if totals[0] % 2 or totals[1] % 2:
                raise ValueError(f"{op}: padding='same' with an even (dilated) kernel "
                                 f"{(kh, kw)} needs asymmetric padding, which fastconv does "
                                 "not support; pad the input explicitly")
            padding = (totals[0] // 2, totals[1] // 2)
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'valid' or 'same', "
                             f"got {padding!r}")
    padding = _pair(op, "padding", padding, 0)
    _same_device(op, input, weight=weight, bias=bias)
    n, c, h, w = input.shape
    k = weight.shape[0]
    if weight.shape[1] * groups != c:
        raise ValueError(f"{op}: input has {c} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    if k % groups:
        raise ValueError(f"{op}: out_channels={k} (weight {tuple(weight.shape)}) is not "
                         f"divisible by groups={groups}")
    _optional_vector(op, "bias", bias, k, "out_channels")
    if autocast:
        input, weight, bias = _autocast(input, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{op}: input is {input.dtype} but {name} is {t.dtype}; pass "
                            "tensors of one dtype (or run under torch.autocast)")
    for axis, size, kk, s, p, d in (("height", h, kh, stride[0], padding[0], dilation[0]),
                                    ("width", w, kw, stride[1], padding[1], dilation[1])):
        if size + 2 * p < d * (kk - 1) + 1:
            raise ValueError(
                f"{op}: kernel {(kh, kw)} (dilation {dilation}) is larger than the padded "
                f"input {axis} {size} + 2*{p} (input {tuple(input.shape)})")
    return dict(input=input, weight=weight, bias=bias, stride=stride, padding=padding,
                dilation=dilation, groups=groups, relu=bool(relu))

def _pool_geometry(op, input, kernel_size, stride, padding, dilation, ceil_mode):
    # torch pools integer tensors too: the backends refuse them, so auto runs torch
    _tensor(op, "input", input, 4, "(N, C, H, W)", integer=True)
    kernel_size = _pair(op, "kernel_size", kernel_size, 1)
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = kernel_size
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    if padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(f"{op}: padding {padding} must be at most half of kernel_size "
                         f"{kernel_size}")
    h, w = input.shape[2:]
    out = (pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
           pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))
    if min(out) < 1:
        raise ValueError(f"{op}: kernel_size {kernel_size} (dilation {dilation}, padding "
                         f"{padding}) is larger than the input {tuple(input.shape)}: the "
                         f"output would be {out}")
    for axis, size, n_out, k, s, p, d in zip(("height", "width"), (h, w), out, kernel_size,
                                             stride, padding, dilation):
        if d > 1 and not all(_window_touches_input(o * s - p, k, d, size) for o in range(n_out)):
            # torch gives such a window -inf and an out-of-range index, and its backward
            # writes outside the plane: refuse the geometry instead
            raise ValueError(f"{op}: with dilation {dilation} and padding {padding} some "
                             f"pooling windows along the {axis} ({size}) lie entirely in the "
                             "padding; reduce the padding or the dilation")
    return kernel_size, stride, padding, dilation


def _window_touches_input(start: int, k: int, d: int, size: int) -> bool:
    return any(0 <= start + i * d < size for i in range(k))

def check_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                      return_indices=False, *, relu=False) -> dict[str, Any]:
    k, s, p, d = _pool_geometry("max_pool2d", input, kernel_size, stride, padding, dilation,
                                ceil_mode)
    return dict(input=input, kernel_size=k, stride=s, padding=p, dilation=d,
                ceil_mode=bool(ceil_mode), return_indices=bool(return_indices), relu=bool(relu))

def check_avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                      count_include_pad=True, divisor_override=None) -> dict[str, Any]:
    k, s, p, _ = _pool_geometry("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and (not isinstance(divisor_override, Integral)
                                         or divisor_override == 0):
        raise ValueError(f"avg_pool2d: divisor_override must be a non-zero int or None, got "
                         f"{divisor_override!r}")
    return dict(input=input, kernel_size=k, stride=s, padding=p, ceil_mode=bool(ceil_mode),
                count_include_pad=bool(count_include_pad),
                divisor_override=None if divisor_override is None else int(divisor_override))

def check_adaptive_avg_pool2d(input, output_size) -> dict[str, Any]:
    op = "adaptive_avg_pool2d"
    _tensor(op, "input", input, 4, "(N, C, H, W)")
    if isinstance(output_size, Integral) or output_size is None:
        output_size = (output_size, output_size)
    if not isinstance(output_size, (tuple, list, torch.Size)) or len(output_size) != 2:
        raise TypeError(f"{op}: output_size must be an int or a pair, got {output_size!r}")
    size = tuple(int(input.shape[2 + i]) if o is None else o for i, o in enumerate(output_size))
    size = _pair(op, "output_size", size, 1)
    return dict(input=input, output_size=size)

def check_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                      momentum=0.1, eps=1e-05, *, relu=False, residual=None) -> dict[str, Any]:
    op = "batch_norm"
    _tensor(op, "input", input, 4, "(N, C, H, W)")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _optional_vector(op, name, t, c, "num_features = input channels")
        if t is not None and t.dtype not in (input.dtype, torch.float32):
            raise TypeError(f"{op}: {name} is {t.dtype} but input is {input.dtype}; it must "
                            "be float32 or the input's dtype")
    _same_device(op, input, running_mean=running_mean, running_var=running_var, weight=weight,
                 bias=bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    if training and running_mean is not None:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.requires_grad:
                raise RuntimeError(f"{op}: {name} requires grad but is updated in place in "
                                   "training mode; detach it or register it as a buffer")
    if momentum is None or isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}: momentum must be a float, got {momentum!r} (momentum=None, the "
                        "cumulative average, is a fastconv.nn.BatchNorm2d option)")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    if training and input.numel() // max(c, 1) == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(input.shape)}")
    if residual is not None:
        check_residual(op, input, residual)
    return dict(input=input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias, training=bool(training), momentum=float(momentum), eps=float(eps),
                relu=bool(relu), residual=residual)


def _format_name(t: torch.Tensor) -> str:
    return "channels_last" if dense_channels_last(t) else "contiguous (NCHW)"


def check_residual(op: str, input: torch.Tensor, residual: Any) -> None:
    """``residual`` is added to the normalised output: the kernels read it element for element
    beside the input, so it must match the input exactly (no broadcasting, no promotion)."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: residual must be a torch.Tensor or None, got "
                        f"{type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(f"{op}: residual must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"{op}: residual is {residual.dtype} but input is {input.dtype}; they "
                        "must have one dtype")
    if residual.device != input.device:
        raise RuntimeError(f"{op}: residual is on {residual.device} but input is on "
                           f"{input.device}; move them to one device")
    if dense_channels_last(residual) != dense_channels_last(input):
        raise ValueError(f"{op}: residual is {_format_name(residual)} (strides "
                         f"{residual.stride()}) but input {tuple(input.shape)} is "
                         f"{_format_name(input)} (strides {input.stride()}); pass them in one "
                         "memory format")


CHECKS = {
    "conv2d_relu": check_conv2d_relu,
    "max_pool2d": check_max_pool2d,
    "batch_norm": check_batch_norm,
    "avg_pool2d": check_avg_pool2d,
    "adaptive_avg_pool2d": check_adaptive_avg_pool2d,
}
