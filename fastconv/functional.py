"""The functional API: torch.nn.functional's names, arguments and defaults, plus ``relu=`` and
``backend=``.

Every function validates its arguments here, once, for all backends (errors name the argument
and the shapes, and are raised before anything is modified), applies autocast, then hands the
normalised arguments to the backend the dispatcher picks (see ``fastconv.dispatch``).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import (CHECKS, check_adaptive_avg_pool2d, check_avg_pool2d, check_batch_norm,
                     check_conv2d_relu, check_max_pool2d)

IntPair = Union[int, Sequence[int]]

__all__ = ["conv2d_relu", "max_pool2d", "batch_norm", "avg_pool2d", "adaptive_avg_pool2d",
           "explain"]


# --------------------------------------------------------------------------- conv2d_relu
def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                relu=True, backend=None):
    """``relu(conv2d(input, weight, bias, ...))`` in one kernel (``relu=False``: the plain conv).

    Arguments and defaults are those of :func:`torch.nn.functional.conv2d`. The output keeps
    the input's memory format.
    """
    # the decided fast path first: a key is stored only for a call that reached _run as given
    # (batched, without uneven 'same' padding), so other calls miss it and go on below
    key = dispatch.call_key("conv2d_relu", (input, weight, bias), (stride, padding, dilation,
                            groups), (relu,), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input, weight, bias)
    if _unbatched(input):
        return conv2d_relu(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                           relu=relu, backend=backend).squeeze(0)
    if padding == "same" and _uneven_same(weight, stride, dilation):
        input, padding = _pad_same(input, weight, dilation)
        return conv2d_relu(input, weight, bias, stride, padding, dilation, groups, relu=relu,
                           backend=backend)
    args = check_conv2d_relu(input, weight, bias, stride, padding, dilation, groups, relu=relu)
    return _run("conv2d_relu", args, backend, key)


# --------------------------------------------------------------------------- pools
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, relu=False, backend=None):
    """:func:`torch.nn.functional.max_pool2d`, optionally fused with a preceding ReLU.

    ``relu=True`` computes ``max_pool2d(relu(input))`` (= ``relu(max_pool2d(input))``) in one
    pass; returned indices are then those of the max-pool of ``input`` itself.
    """
    key = dispatch.call_key("max_pool2d", (input,), (kernel_size, stride, padding, dilation),
                            (ceil_mode, return_indices, relu), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input)
    if _unbatched(input):
        out = max_pool2d(input.unsqueeze(0), kernel_size, stride, padding, dilation, ceil_mode,
                         return_indices, relu=relu, backend=backend)
        return tuple(t.squeeze(0) for t in out) if return_indices else out.squeeze(0)
    args = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode,
                            return_indices, relu=relu)
    return _run("max_pool2d", args, backend, key)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, backend=None):
    """:func:`torch.nn.functional.avg_pool2d`."""
    key = dispatch.call_key("avg_pool2d", (input,), (kernel_size, stride, padding,
                            divisor_override), (ceil_mode, count_include_pad), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input)
    if _unbatched(input):
        return avg_pool2d(input.unsqueeze(0), kernel_size, stride, padding, ceil_mode,
                          count_include_pad, divisor_override, backend=backend).squeeze(0)
    args = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)
    return _run("avg_pool2d", args, backend, key)


def adaptive_avg_pool2d(input, output_size, *, backend=None):
    """:func:`torch.nn.functional.adaptive_avg_pool2d` (``None`` keeps that dimension)."""
    key = dispatch.call_key("adaptive_avg_pool2d", (input,), (output_size,), (), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input)
    if _unbatched(input):
        return adaptive_avg_pool2d(input.unsqueeze(0), output_size, backend=backend).squeeze(0)
    args = check_adaptive_avg_pool2d(input, output_size)
    return _run("adaptive_avg_pool2d", args, backend, key)


# --------------------------------------------------------------------------- batch_norm
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-05, *, relu=False, residual=None, backend=None):
    """:func:`torch.nn.functional.batch_norm` on (N, C, H, W) input, optionally fused with ReLU.

    In training mode ``running_mean``/``running_var`` (when given) are updated in place with
    the unbiased batch variance, exactly as torch does. ``residual`` (a tensor of the input's
    shape, dtype, device and memory format) is added to the normalised output before the
    ReLU: ``relu(batch_norm(input) + residual)``, ResNet's block ending, in one pass.
    """
    key = dispatch.call_key("batch_norm", (input, running_mean, running_var, weight, bias,
                                           residual), (momentum, eps), (training, relu), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input, running_mean, running_var, weight, bias, residual)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       relu, residual, backend, key)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu,
                residual, backend, key=None):
    """batch_norm's checked path; the decided call is remembered under fast-path ``key`` (None
    where there is none, as for ``nn.BatchNorm2d(momentum=None)``, whose cumulative-average
    momentum changes every call)."""
    args = check_batch_norm(input, running_mean, running_var, weight, bias, training,
                            momentum, eps, relu=relu, residual=residual)
    return _run("batch_norm", args, backend, key)


# --------------------------------------------------------------------------- torch's extras
def _unbatched(input) -> bool:
    """(C, H, W) input, which torch.nn.functional accepts: run it as a batch of one."""
    return isinstance(input, torch.Tensor) and input.dim() == 3


def _uneven_same(weight, stride, dilation) -> bool:
    """padding='same' needing more padding after than before (an even dilated kernel): torch
    pads the extra row/column explicitly, and so does fastconv, then runs a symmetric conv."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or stride not in (1, (1, 1),
                                                                                   [1, 1]):
        return False  # the checks raise the usual error
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    return len(d) == 2 and any(di * (k - 1) % 2 for di, k in zip(d, weight.shape[2:]))


def _pad_same(input, weight, dilation):
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    th, tw = (di * (k - 1) for di, k in zip(d, weight.shape[2:]))
    # as torch: the odd row/column goes after (bottom/right); the conv then pads symmetrically
    pad = F.pad(input, (0, tw % 2, 0, th % 2))
    return pad, (th // 2, tw // 2)


_FUNCTIONS = {"conv2d_relu": conv2d_relu, "max_pool2d": max_pool2d, "avg_pool2d": avg_pool2d,
              "adaptive_avg_pool2d": adaptive_avg_pool2d}


# --------------------------------------------------------------------------- dispatch
def _run(op: str, args: dict[str, Any], backend: Optional[str], key: Optional[tuple] = None):
    impl, final = dispatch.select_call(op, args, backend)
    out = getattr(impl, op)(*args.values())
    if final:  # only once the call has run: a failing call keeps taking the checked path
        dispatch.remember(key, op, impl, args)
    return out


def _checked(op: str, args, kwargs) -> dict[str, Any]:
    """The normalised arguments of a call, as the function itself runs it: unbatched input
    as a batch of one, padding='same' with an even kernel padded explicitly."""
    if op in _FUNCTIONS:
        call = inspect.signature(_FUNCTIONS[op]).bind(*args, **kwargs).arguments
        if _unbatched(call["input"]):
            call["input"] = call["input"].unsqueeze(0)
        if op == "conv2d_relu" and call.get("padding") == "same" and _uneven_same(
                call["weight"], call.get("stride", 1), call.get("dilation", 1)):
            call["input"], call["padding"] = _pad_same(call["input"], call["weight"],
                                                       call.get("dilation", 1))
        args, kwargs = (), call
    return CHECKS[op](*args, **kwargs)


def backend_for(op: str, *args, backend=None, **kwargs) -> str:
    """The name of the backend that would run this call."""
    return dispatch.select(op, _checked(op, args, kwargs), backend).name


def explain(op: str, *args, **kwargs) -> str:
    """Which backend runs ``op(*args, **kwargs)``, why each other one would not, and for
    ``auto`` each pass's decision (``infer``: forward alone, ``train``: forward + backward)
    with the candidates' measured times.

    >>> print(fastconv.explain("conv2d_relu", x, w, b, padding=1))
    """
    backend = kwargs.pop("backend", None)
    checked = _checked(op, args, kwargs)
    answers = dispatch.reasons(op, checked)
    try:
        chosen = dispatch.select(op, checked, backend).name
    except dispatch.BackendUnavailableError as exc:
        chosen = None
        head = str(exc)
    else:
        head = f"{op}: runs on {chosen!r} (backend={dispatch.resolve_name(backend)!r})"
    lines = [head]
    for name, reason in answers.items():
        lines.append(f"  {name:10s} {'can run' if reason is None else reason}")
    if chosen is not None and dispatch.resolve_name(backend) == "auto":
        from . import selection

        for pass_ in ("infer", "train"):
            entry = selection.decided(op, checked, pass_)
            lines.append(f"  {pass_:10s} {selection.describe(entry)}")
    return "\n".join(lines)
