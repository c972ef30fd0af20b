"""The functional API: torch.nn.functional's names, arguments and defaults, plus ``relu=`` and
``backend=``.

Every function validates its arguments here, once, for all backends (errors name the argument
and the shapes, and are raised before anything is modified), applies autocast, then hands the
normalised arguments to the backend the dispatcher picks (see ``fastconv.dispatch``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

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
    key = dispatch.call_key("conv2d_relu", (input, weight, bias), (stride, padding, dilation,
                            groups), (relu,), backend)
    if key is not None:
        fast = dispatch.FAST.get(key)
        if fast is not None:
            return fast(input, weight, bias)
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
    args = check_adaptive_avg_pool2d(input, output_size)
    return _run("adaptive_avg_pool2d", args, backend, key)


# --------------------------------------------------------------------------- batch_norm
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-05, *, relu=False, backend=None):
    """:func:`torch.nn.functional.batch_norm` on (N, C, H, W) input, optionally fused with ReLU.

    In training mode ``running_mean``/``running_var`` (when given) are updated in place with
    the unbiased batch variance, exactly as torch does.
    """
    args = check_batch_norm(input, running_mean, running_var, weight, bias, training,
                            momentum, eps, relu=relu)
    return _run("batch_norm", args, backend)


# --------------------------------------------------------------------------- dispatch
def _run(op: str, args: dict[str, Any], backend: Optional[str], key: Optional[tuple] = None):
    impl, final = dispatch.select_call(op, args, backend)
    out = getattr(impl, op)(*args.values())
    if final:  # only once the call has run: a failing call keeps taking the checked path
        dispatch.remember(key, op, impl, args)
    return out


def backend_for(op: str, *args, backend=None, **kwargs) -> str:
    """The name of the backend that would run this call."""
    return dispatch.select(op, CHECKS[op](*args, **kwargs), backend).name


def explain(op: str, *args, **kwargs) -> str:
    """Which backend runs ``op(*args, **kwargs)``, why each other one would not, and for
    ``auto`` each pass's decision (``infer``: forward alone, ``train``: forward + backward)
    with the candidates' measured times.

    >>> print(fastconv.explain("conv2d_relu", x, w, b, padding=1))
    """
    backend = kwargs.pop("backend", None)
    checked = CHECKS[op](*args, **kwargs)
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
