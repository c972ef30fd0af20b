"""conv2d_relu with its passes from different backends (``auto``'s per-pass decision).

The forward of one backend, the grad_input of another and the grad_weight (with grad_bias) of
a third run under one autograd Function. Every backend's passes save the same tensors (input,
weight, and with ``relu`` the output), so any combination is consistent; see
``fastconv.backends.base.ConvPasses``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends.base import Backend

PIECES = ("forward", "grad_input", "grad_weight")


def _passes(name: str):
    from . import dispatch

    return dispatch.BACKENDS[name].conv2d_relu_passes()


class _MixedConv2dReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, relu, fwd, gi, gw):
        out = _passes(fwd).forward(input, weight, bias, stride, padding, dilation, groups, relu)
        ctx.save_for_backward(input, weight, out if relu else None)
        ctx.geometry = (stride, padding, dilation, groups, relu)
        ctx.names = (gi, gw)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, output = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        gi_name, gw_name = ctx.names
        geo = ctx.geometry
        gi = gw = gb = None
        if gi_name == gw_name or not (need_w or need_b) or not need_x:
            # one backend serves every gradient needed: its one mask pass feeds both GEMMs
            name = gi_name if need_x else gw_name
            res = _passes(name).backward(grad, input, weight, output, *geo,
                                         (need_x, need_w, need_b))
            gi, gw, gb = (r if m else None for r, m in zip(res, (need_x, need_w, need_b)))
        else:
            gi = _passes(gi_name).backward(grad, input, weight, output, *geo,
                                           (True, False, False))[0]
            res = _passes(gw_name).backward(grad, input, weight, output, *geo,
                                            (False, need_w, need_b))
            gw, gb = (res[1] if need_w else None), (res[2] if need_b else None)
        return gi, gw, gb, None, None, None, None, None, None, None, None


class Mixed(Backend):
    """conv2d_relu with ``forward``, ``grad_input`` and ``grad_weight`` from the named backends
    (a name is None where that gradient is never needed; the forward's backend then serves it)."""

    def __init__(self, forward: str, grad_input: Optional[str], grad_weight: Optional[str]):
        self.forward, self.grad_input = forward, grad_input or forward
        self.grad_weight = grad_weight or forward
        self.name = f"forward {forward}, grad_input {grad_input or 'unused'}, " \
                    f"grad_weight {grad_weight or 'unused'}"

    def conv2d_relu(self, input, weight, bias, stride, padding, dilation, groups, relu):
        return _MixedConv2dReLU.apply(input, weight, bias, list(stride), list(padding),
                                      list(dilation), int(groups), bool(relu), self.forward,
                                      self.grad_input, self.grad_weight)


_MIXED: dict[tuple, Mixed] = {}


def mixed(forward: str, grad_input: Optional[str], grad_weight: Optional[str]) -> Mixed:
    key = (forward, grad_input, grad_weight)
    impl = _MIXED.get(key)
    if impl is None:
        impl = _MIXED[key] = Mixed(*key)
    return impl

