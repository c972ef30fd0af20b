"""The "torch" backend: each op written with plain torch ops.

Always available, on every device and dtype torch supports, and the ground truth the tests
compare the kernels with. It fuses nothing: it is what a user's stock model computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, ConvPasses


class TorchConvPasses(ConvPasses):
    """ATen's passes: the conv (+ReLU); the mask then ``convolution_backward``."""

    def forward(self, input, weight, bias, stride, padding, dilation, groups, relu):
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return torch.relu(out) if relu else out

    def backward(self, grad_output, input, weight, output, stride, padding, dilation, groups,
                 relu, output_mask):
        g = torch.ops.aten.threshold_backward(grad_output, output, 0) if relu else grad_output
        bias_sizes = [weight.shape[0]] if output_mask[2] else None
        return torch.ops.aten.convolution_backward(
            g, input, weight, bias_sizes, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, list(output_mask))


_TORCH_PASSES = TorchConvPasses()


def _int_if_square(v):
    """(a, a) as a: torch's argument parser reads an int faster than a tuple (0.4 us a call)."""
    return v[0] if isinstance(v, tuple) and len(v) == 2 and v[0] == v[1] else v


class TorchBackend(Backend):
    name = "torch"

    def conv2d_relu_passes(self):
        return _TORCH_PASSES

    def bind(self, op, args):
        """As :meth:`Backend.bind`, one call shorter for the ops every small model runs: a
        decided torch layer should cost what the stock layer costs. The function is marked
        ``any_tensors``: torch's own ops check their tensors, so it computes the right thing
        (or raises torch's error) for tensors of any shape, dtype, device or layout, and a
        layer's memo need not check the layer's own tensors before running it."""
        if type(self) is not TorchBackend:  # a subclass may override the ops
            return super().bind(op, args)
        fn = self._bind(op, args)
        fn.any_tensors = True
        return fn

    def _bind(self, op, args):
        if op == "conv2d_relu":
            s, p, d = (_int_if_square(args[k]) for k in ("stride", "padding", "dilation"))
            g, relu = args["groups"], args["relu"]
            conv, relu_ = torch.conv2d, torch.relu_
            if relu:
                # in place on the conv's fresh output: its backward saves the input and the
                # weight, never the output, and the ReLU then allocates nothing
                return lambda x, w, b: relu_(conv(x, w, b, s, p, d, g))
            return lambda x, w, b: conv(x, w, b, s, p, d, g)
        if op == "avg_pool2d":
            rest = tuple(_int_if_square(v) for v in args.values())[1:]
            pool = F.avg_pool2d
            return lambda x: pool(x, *rest)
        if op == "max_pool2d" and not args["return_indices"]:
            k, s, p, d = (_int_if_square(args[n]) for n in ("kernel_size", "stride", "padding",
                                                            "dilation"))
            ceil, relu = args["ceil_mode"], args["relu"]
            pool, relu_ = torch.max_pool2d, torch.relu_  # what F.max_pool2d calls, after its checks
            if relu:  # in place: the pool's backward reads its input and indices, not its output
                return lambda x: relu_(pool(x, k, s, p, d, ceil))
            return lambda x: pool(x, k, s, p, d, ceil)
        if op == "adaptive_avg_pool2d":
            size = args["output_size"]
            if isinstance(size, int) or None not in size:  # no size kept from the input
                pool = torch._C._nn.adaptive_avg_pool2d  # what F.adaptive_avg_pool2d calls
                return lambda x: pool(x, size)
        if op == "batch_norm":
            training, momentum, eps, relu = (args[n] for n in ("training", "momentum", "eps",
                                                               "relu"))
            bn, cudnn = torch.batch_norm, torch.backends.cudnn  # as F.batch_norm calls it

            def run(x, rm, rv, w, b, residual=None):  # as self.batch_norm computes it
                out = bn(x, w, b, rm, rv, training, momentum, eps, cudnn.enabled)
                # in place on batch norm's fresh output: its backward does not read it
                if residual is not None:
                    out = out.add_(residual)
                return out.relu_() if relu else out
            return run
        return super().bind(op, args)

    def conv2d_relu(self, input, weight, bias, stride, padding, dilation, groups, relu):
        out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return torch.relu(out) if relu else out

    def max_pool2d(self, input, kernel_size, stride, padding, dilation, ceil_mode,
                   return_indices, relu):
        # max and ReLU commute, so ReLU before the pool equals ReLU after it; applying it to
        # the (smaller) pooled tensor is what a fused kernel does too.
        result = F.max_pool2d(input, kernel_size, stride, padding, dilation,
                              ceil_mode=ceil_mode, return_indices=return_indices)
        if not relu:
            return result
        if return_indices:
            out, idx = result
            return torch.relu(out), idx
        return torch.relu(result)

    def batch_norm(self, input, running_mean, running_var, weight, bias, training,
                   momentum, eps, relu, residual=None):
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training,
                           momentum, eps)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out

    def avg_pool2d(self, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)

    def adaptive_avg_pool2d(self, input, output_size):
        return F.adaptive_avg_pool2d(input, output_size)
